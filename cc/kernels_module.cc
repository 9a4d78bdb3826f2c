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

Reduction ReductionFromName(const std::string& name) {
  Reduction reduction;
  if (!ParseReduction(name, &reduction)) {
    throw py::value_error("reduction must be 'sum', 'mean' or 'weighted_mean', got " + name);
  }
  return reduction;
}

py::tuple ContrastiveLossReducedCpuNumpy(py::array labels, py::array distances,
                                         py::object sample_weight, double margin,
                                         const std::string& reduction, double loss_scale) {
  CheckMargin(margin);
  labels = py::array::ensure(labels, py::array::c_style);
  distances = py::array::ensure(distances, py::array::c_style);
  ReducedLossArgs args;
  args.label_type = DTypeOfArray(labels, "labels");
  args.distance_type = DTypeOfArray(distances, "distances");
  CheckDistanceDType(args.distance_type);
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  // No weights means a scalar weight of 1.
  const py::array weights =
      sample_weight.is_none()
          ? py::array(py::module_::import("numpy").attr("ones")(py::tuple(), distances.dtype()))
          : py::array::ensure(sample_weight, py::array::c_style);
  if (!weights.dtype().is(distances.dtype())) {
    throw py::type_error("sample_weight must have the dtype of distances");
  }
  args.scalar_weight = weights.ndim() == 0;
  if (!args.scalar_weight) CheckSameShape("sample_weight", ShapeOf(weights), "labels", ShapeOf(labels));
  py::array loss(distances.dtype(), std::vector<int64_t>{});
  py::array grad(distances.dtype(), shape);
  double gradient_scale = 0;
  args.labels = labels.data();
  args.distances = distances.data();
  args.weights = weights.data();
  args.n = distances.size();
  args.margin = margin;
  args.reduction = ReductionFromName(reduction);
  args.loss_scale = loss_scale;
  args.loss = loss.mutable_data();
  args.grad = grad.mutable_data();
  args.gradient_scale = &gradient_scale;
  {
    py::gil_scoped_release release;
    ContrastiveLossReducedCpu(args, SerialFor);
  }
  return py::make_tuple(loss, grad, gradient_scale);
}

#if FC_WITH_CUDA
// A device buffer described by the __cuda_array_interface__ protocol (CuPy,
// PyTorch, Numba, JAX...). 16-bit brain floats have no typestr of their own:
// pass them as uint16 arrays with dtype="bfloat16".
struct DeviceBuffer {
  void* data;
  bool readonly;
  std::vector<int64_t> shape;
  py::dtype dtype;  // as the array describes itself (typestr)
  int64_t bytes;
};

struct DeviceArray : DeviceBuffer {
  DType type;  // what the kernels read it as
};

// Any C-contiguous CUDA array, untyped.
DeviceBuffer DeviceBufferOf(const py::object& obj, const char* what) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    throw py::type_error(std::string(what) + " must expose __cuda_array_interface__ (a CUDA array)");
  }
  const py::dict cai = obj.attr("__cuda_array_interface__");
  const py::tuple data = cai["data"];
  DeviceBuffer out{reinterpret_cast<void*>(data[0].cast<uintptr_t>()), data[1].cast<bool>(),
                   cai["shape"].cast<std::vector<int64_t>>(),
                   py::dtype(cai["typestr"].cast<std::string>()), 0};
  out.bytes = out.dtype.itemsize();
  for (int64_t extent : out.shape) out.bytes *= extent;
  // Strides, when given, must describe the C-contiguous layout.
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = cai["strides"].cast<std::vector<int64_t>>();
    int64_t expected = out.dtype.itemsize();
    for (size_t k = out.shape.size(); k-- > 0;) {
      if (out.shape[k] > 1 && strides[k] != expected) {
        throw py::value_error(std::string(what) + " must be C-contiguous");
      }
      expected *= out.shape[k];
    }
  }
  return out;
}

DeviceArray FromCudaArrayInterface(const py::object& obj, const char* what,
                                   const py::object& dtype_override) {
  DeviceArray out{DeviceBufferOf(obj, what), DType::kBool};
  const std::string name = dtype_override.is_none() ? std::string(py::str(out.dtype.attr("name")))
                                                    : dtype_override.cast<std::string>();
  out.type = DTypeFromName(name, what);
  if (!dtype_override.is_none() &&
      out.dtype.itemsize() != py::dtype(name == "bfloat16" ? "uint16" : name).itemsize()) {
    throw py::type_error(std::string(what) + ": dtype override " + name +
                         " does not match the element size of the array");
  }
  return out;
}

int64_t ElementCount(const DeviceBuffer& a) { return a.bytes / a.dtype.itemsize(); }

// The arrays both CUDA entry points take, checked: labels and distances of one
// shape, grad like distances, loss like distances (per-sample) or one value
// (reduced), outputs of the distances' dtype and writable.
struct CudaLossArrays {
  DeviceArray labels, distances, loss, grad;
};

CudaLossArrays ReadCudaLossArrays(const py::object& labels, const py::object& distances,
                                  const py::object& loss, const py::object& grad,
                                  const py::object& labels_dtype,
                                  const py::object& distances_dtype, bool reduced) {
  CudaLossArrays a{FromCudaArrayInterface(labels, "labels", labels_dtype),
                   FromCudaArrayInterface(distances, "distances", distances_dtype),
                   FromCudaArrayInterface(loss, "loss", distances_dtype),
                   FromCudaArrayInterface(grad, "grad", distances_dtype)};
  CheckDistanceDType(a.distances.type);
  CheckSameShape("distances", a.distances.shape, "labels", a.labels.shape);
  CheckSameShape("grad", a.grad.shape, "distances", a.distances.shape);
  if (reduced) {
    if (ElementCount(a.loss) != 1) throw py::value_error("loss must hold one value");
  } else {
    CheckSameShape("loss", a.loss.shape, "distances", a.distances.shape);
  }
  if (a.loss.type != a.distances.type || a.grad.type != a.distances.type) {
    throw py::type_error("loss and grad must have the dtype of distances");
  }
  if (a.loss.readonly || a.grad.readonly) throw py::value_error("loss and grad must be writable");
  return a;
}

void ThrowIfFailed(const GpuStatus& status) {
  if (!status.ok()) throw std::runtime_error(std::string("CUDA launch failed: ") + status.error);
}

void ContrastiveLossCuda(const py::object& labels, const py::object& distances,
                         const py::object& loss, const py::object& grad, double margin,
                         uintptr_t stream, const py::object& labels_dtype,
                         const py::object& distances_dtype) {
  CheckMargin(margin);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, false);
  ThrowIfFailed(ContrastiveLossGpu(a.labels.type, a.distances.type, a.labels.data,
                                   a.distances.data, ElementCount(a.distances), margin,
                                   a.loss.data, a.grad.data, reinterpret_cast<void*>(stream)));
}

void ContrastiveLossReducedCuda(const py::object& labels, const py::object& distances,
                                const py::object& sample_weight, const py::object& loss,
                                const py::object& grad, const py::object& gradient_scale,
                                const py::object& workspace, double margin,
                                const std::string& reduction, double loss_scale, uintptr_t stream,
                                const py::object& labels_dtype,
                                const py::object& distances_dtype) {
  CheckMargin(margin);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, true);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", distances_dtype);
  const DeviceArray s = FromCudaArrayInterface(gradient_scale, "gradient_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  if (!w.shape.empty()) CheckSameShape("sample_weight", w.shape, "distances", a.distances.shape);
  if (w.type != a.distances.type) {
    throw py::type_error("sample_weight must have the dtype of distances");
  }
  if (s.type != DType::kFloat64 || ElementCount(s) != 1) {
    throw py::value_error("gradient_scale must hold one float64");
  }
  const int64_t n = ElementCount(a.distances);
  if (ws.bytes < ContrastiveLossReducedGpuWorkspace(n)) {
    throw py::value_error("workspace is smaller than reduced_workspace_bytes(n)");
  }
  ReducedLossArgs args;
  args.label_type = a.labels.type;
  args.distance_type = a.distances.type;
  args.labels = a.labels.data;
  args.distances = a.distances.data;
  args.weights = w.data;
  args.scalar_weight = w.shape.empty();
  args.n = n;
  args.margin = margin;
  args.reduction = ReductionFromName(reduction);
  args.loss_scale = loss_scale;
  args.loss = a.loss.data;
  args.grad = a.grad.data;
  args.gradient_scale = s.data;
  ThrowIfFailed(ContrastiveLossReducedGpu(args, ws.data, reinterpret_cast<void*>(stream)));
}

void ScaleCuda(const py::object& gradient, const py::object& scale, const py::object& out,
               uintptr_t stream, const py::object& dtype) {
  const DeviceArray g = FromCudaArrayInterface(gradient, "gradient", dtype);
  const DeviceArray s = FromCudaArrayInterface(scale, "scale", dtype);
  const DeviceArray o = FromCudaArrayInterface(out, "out", dtype);
  CheckDistanceDType(g.type);
  CheckSameShape("out", o.shape, "gradient", g.shape);
  if (ElementCount(s) != 1 || s.type != g.type || o.type != g.type) {
    throw py::value_error("scale must be one value of the gradient's dtype, out that dtype");
  }
  if (o.readonly) throw py::value_error("out must be writable");
  ThrowIfFailed(
      ScaleGpu(g.type, g.data, s.data, ElementCount(g), o.data, reinterpret_cast<void*>(stream)));
}
#endif

}  // namespace
}  // namespace fused_contrastive

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Raw fused contrastive-loss kernels on NumPy arrays (no TensorFlow needed).";
  m.def("contrastive_loss_cpu", &fused_contrastive::ContrastiveLossCpuNumpy, py::arg("labels"),
        py::arg("distances"), py::arg("margin") = 1.0,
        "Per-sample loss and d(loss)/d(distance) on the CPU, single-threaded; returns (loss, grad).");
  m.def("contrastive_loss_reduced_cpu", &fused_contrastive::ContrastiveLossReducedCpuNumpy,
        py::arg("labels"), py::arg("distances"), py::arg("sample_weight") = py::none(),
        py::arg("margin") = 1.0, py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0,
        "The fused-reduction kernel on the CPU, single-threaded; returns (loss, grad, "
        "gradient_scale). reduction: 'sum', 'mean' or 'weighted_mean'; sample_weight: None, a "
        "scalar array or one weight per element, of the distances' dtype.");
#if FC_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("reduced_workspace_bytes", &fused_contrastive::ContrastiveLossReducedGpuWorkspace,
        py::arg("n"), "Device scratch bytes contrastive_loss_reduced_cuda needs for n elements.");
  m.def("contrastive_loss_reduced_cuda", &fused_contrastive::ContrastiveLossReducedCuda,
        py::arg("labels"), py::arg("distances"), py::arg("sample_weight"), py::arg("loss"),
        py::arg("grad"), py::arg("gradient_scale"), py::arg("workspace"), py::arg("margin") = 1.0,
        py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0, py::arg("stream") = 0,
        py::arg("labels_dtype") = py::none(), py::arg("distances_dtype") = py::none(),
        "The fused-reduction kernel on CUDA arrays; writes loss (one value), grad and "
        "gradient_scale (one float64). sample_weight: a 0-d array or one weight per element.");
  m.def("scale_cuda", &fused_contrastive::ScaleCuda, py::arg("gradient"), py::arg("scale"),
        py::arg("out"), py::arg("stream") = 0, py::arg("dtype") = py::none(),
        "out = gradient * scale[0] on CUDA arrays (the reduced op's backward).");
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
