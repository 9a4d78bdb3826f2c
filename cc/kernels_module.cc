// pybind11 access to the raw kernels, so they can be tested and benchmarked
// where TensorFlow is absent (the GPU check machine has none).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "contrastive_kernels.h"

namespace py = pybind11;

namespace fused_contrastive {
namespace {

DType DTypeFromName(const std::string& name, const char* what) {
  for (DType t : kAllDTypes) {
    if (name == DTypeName(t)) return t;
  }
  throw py::type_error(std::string(what) + ": unsupported dtype " + name);
}

DType DTypeOfArray(const py::array& a, const char* what) {
  return DTypeFromName(py::str(a.dtype().attr("name")), what);
}

void CheckDistanceDType(DType t) {
  if (!IsDistanceDType(t)) {
    throw py::type_error(std::string("distances must be float16, bfloat16, float32 or float64, got ") +
                         DTypeName(t));
  }
}

void CheckMargin(double margin) {
  if (!IsValidMargin(margin)) {
    throw py::value_error("margin must be finite and non-negative, got " + std::to_string(margin));
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return py::str(py::tuple(py::cast(shape)));
}

void CheckSameShape(const char* what, const std::vector<int64_t>& shape, const char* ref_what,
                    const std::vector<int64_t>& ref_shape) {
  if (shape != ref_shape) {
    throw py::value_error(std::string(ref_what) + " and " + what +
                          " must have the same shape, got " + ref_what + " " +
                          ShapeString(ref_shape) + " and " + what + " " + ShapeString(shape));
  }
}

std::vector<int64_t> ShapeOf(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

py::tuple ContrastiveLossCpuNumpy(py::array labels, py::array distances, double margin) {
  CheckMargin(margin);
  labels = py::array::ensure(labels, py::array::c_style);
  distances = py::array::ensure(distances, py::array::c_style);
  const DType label_type = DTypeOfArray(labels, "labels");
  const DType distance_type = DTypeOfArray(distances, "distances");
  CheckDistanceDType(distance_type);
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  py::array loss(distances.dtype(), shape);
  py::array grad(distances.dtype(), shape);
  const void* y = labels.data();
  const void* d = distances.data();
  void* out_loss = loss.mutable_data();
  void* out_grad = grad.mutable_data();
  const int64_t n = distances.size();
  {
    py::gil_scoped_release release;
    ContrastiveLossCpu(label_type, distance_type, y, d, n, margin, out_loss, out_grad, SerialFor);
  }
  return py::make_tuple(loss, grad);
}

#if FC_WITH_CUDA
// A device buffer described by the __cuda_array_interface__ protocol (CuPy,
// PyTorch, Numba, JAX...). 16-bit brain floats have no typestr of their own:
// pass them as uint16 arrays with dtype="bfloat16".
struct DeviceArray {
  void* data;
  bool readonly;
  std::vector<int64_t> shape;
  DType dtype;
};

DeviceArray FromCudaArrayInterface(const py::object& obj, const char* what,
                                   const py::object& dtype_override) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    throw py::type_error(std::string(what) + " must expose __cuda_array_interface__ (a CUDA array)");
  }
  const py::dict cai = obj.attr("__cuda_array_interface__");
  const py::tuple data = cai["data"];
  DeviceArray out;
  out.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  out.readonly = data[1].cast<bool>();
  out.shape = cai["shape"].cast<std::vector<int64_t>>();
  const std::string name = dtype_override.is_none()
                               ? std::string(py::str(py::dtype(cai["typestr"].cast<std::string>())
                                                         .attr("name")))
                               : dtype_override.cast<std::string>();
  out.dtype = DTypeFromName(name, what);
  if (!dtype_override.is_none() && py::dtype(cai["typestr"].cast<std::string>()).itemsize() !=
                                       py::dtype(name == "bfloat16" ? "uint16" : name).itemsize()) {
    throw py::type_error(std::string(what) + ": dtype override " + name +
                         " does not match the element size of the array");
  }
  // Strides, when given, must describe the C-contiguous layout.
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = cai["strides"].cast<std::vector<int64_t>>();
    int64_t expected = py::dtype(cai["typestr"].cast<std::string>()).itemsize();
    for (size_t k = out.shape.size(); k-- > 0;) {
      if (out.shape[k] > 1 && strides[k] != expected) {
        throw py::value_error(std::string(what) + " must be C-contiguous");
      }
      expected *= out.shape[k];
    }
  }
  return out;
}

void ContrastiveLossCuda(const py::object& labels, const py::object& distances,
                         const py::object& loss, const py::object& grad, double margin,
                         uintptr_t stream, const py::object& labels_dtype,
                         const py::object& distances_dtype) {
  CheckMargin(margin);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", labels_dtype);
  const DeviceArray d = FromCudaArrayInterface(distances, "distances", distances_dtype);
  const DeviceArray l = FromCudaArrayInterface(loss, "loss", distances_dtype);
  const DeviceArray g = FromCudaArrayInterface(grad, "grad", distances_dtype);
  CheckDistanceDType(d.dtype);
  CheckSameShape("distances", d.shape, "labels", y.shape);
  CheckSameShape("loss", l.shape, "distances", d.shape);
  CheckSameShape("grad", g.shape, "distances", d.shape);
  if (l.dtype != d.dtype || g.dtype != d.dtype) {
    throw py::type_error("loss and grad must have the dtype of distances");
  }
  if (l.readonly || g.readonly) throw py::value_error("loss and grad must be writable");
  int64_t n = 1;
  for (int64_t extent : d.shape) n *= extent;
  const GpuStatus status = ContrastiveLossGpu(y.dtype, d.dtype, y.data, d.data, n, margin, l.data,
                                              g.data, reinterpret_cast<void*>(stream));
  if (!status.ok()) throw std::runtime_error(std::string("CUDA launch failed: ") + status.error);
}
#endif

}  // namespace
}  // namespace fused_contrastive

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Raw fused contrastive-loss kernels on NumPy arrays (no TensorFlow needed).";
  m.def("contrastive_loss_cpu", &fused_contrastive::ContrastiveLossCpuNumpy, py::arg("labels"),
        py::arg("distances"), py::arg("margin") = 1.0,
        "Per-sample loss and d(loss)/d(distance) on the CPU, single-threaded; returns (loss, grad).");
#if FC_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("contrastive_loss_cuda", &fused_contrastive::ContrastiveLossCuda, py::arg("labels"),
        py::arg("distances"), py::arg("loss"), py::arg("grad"), py::arg("margin") = 1.0,
        py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("distances_dtype") = py::none(),
        "Enqueues the CUDA kernel on `stream` (a cudaStream_t as int; 0 = legacy default stream). "
        "All arrays are CUDA arrays (__cuda_array_interface__); loss and grad are written. "
        "labels_dtype/distances_dtype name the dtype when the typestr cannot (\"bfloat16\" on uint16).");
#else
  m.attr("has_cuda") = false;
#endif
}
