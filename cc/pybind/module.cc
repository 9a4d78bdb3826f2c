// The pybind11 module fused_contrastive._kernels: raw kernels without TensorFlow (the GPU check
// machine has none). Each family registers its own entry points; what serves all of them is here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "core/distances/kernels.h"
#include "pybind/arrays.h"
#include "pybind/registrations.h"

namespace fused_contrastive {
namespace bindings {
namespace {

#if FC_WITH_CUDA
// The backward of every family's reduced op: the gradient times the reduced
// loss's upstream gradient, which stays on the device.
void ScaleCuda(const py::object& gradient, const py::object& scale, const py::object& out,
               uintptr_t stream, const py::object& dtype) {
  const DeviceArray g = FromCudaArrayInterface(gradient, "gradient", dtype);
  const DeviceArray s = FromCudaArrayInterface(scale, "scale", dtype);
  const DeviceArray o = FromCudaArrayInterface(out, "out", dtype);
  CheckFloatDType(g.type, "gradient");
  CheckSameShape("out", o.shape, "gradient", g.shape);
  if (s.elements != 1 || s.type != g.type || o.type != g.type) {
    throw py::value_error("scale must be one value of the gradient's dtype, out that dtype");
  }
  if (o.readonly) throw py::value_error("out must be writable");
  ThrowIfFailed(ScaleGpu(g.type, g.data, s.data, g.elements, o.data, StreamOf(stream)));
}
#endif  // FC_WITH_CUDA

}  // namespace
}  // namespace bindings
}  // namespace fused_contrastive

PYBIND11_MODULE(_kernels, m) {
  namespace bindings = fused_contrastive::bindings;
  namespace py = pybind11;
  m.doc() = "Raw fused contrastive-loss kernels on NumPy arrays (no TensorFlow needed).";
  bindings::RegisterDistances(m);
  bindings::RegisterPairs(m);
  bindings::RegisterInBatch(m);
#if FC_WITH_FFI
  bindings::RegisterFfi(m);
#endif
#if FC_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("scale_cuda", &bindings::ScaleCuda, py::arg("gradient"), py::arg("scale"), py::arg("out"),
        py::arg("stream") = 0, py::arg("dtype") = py::none(),
        "out = gradient * scale[0] on CUDA arrays (the reduced op's backward).");
#else
  m.attr("has_cuda") = false;
#endif
}
