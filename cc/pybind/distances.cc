// Bindings of the "distances" family: the contrastive loss of given distances, per sample and
// with the Keras reduction fused in, on NumPy arrays and on CUDA arrays.
#include "pybind/registrations.h"

#include <string>
#include <vector>

#include "core/distances/kernels.h"
#include "pybind/arrays.h"

namespace fused_contrastive {
namespace bindings {
namespace {

py::tuple ContrastiveLossCpuNumpy(py::array labels, py::array distances, double margin,
                                  int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  labels = KernelArray(labels, "labels");
  distances = KernelArray(distances, "distances");
  const DType label_type = DTypeOfArray(labels, "labels");
  const DType distance_type = DTypeOfArray(distances, "distances");
  CheckFloatDType(distance_type, "distances");
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  py::array loss(distances.dtype(), shape);
  py::array grad(distances.dtype(), shape);
  const LossInputs in{label_type,
                      distance_type,
                      labels.data(),
                      distances.data(),
                      CheckedElementCount(shape, distances.itemsize(), "distances"),
                      margin,
                      similar_label};
  void* out_loss = loss.mutable_data();
  void* out_grad = grad.mutable_data();
  {
    py::gil_scoped_release release;
    ContrastiveLossCpu(in, out_loss, out_grad, SerialFor);
  }
  return py::make_tuple(loss, grad);
}

py::tuple ContrastiveLossReducedCpuNumpy(py::array labels, py::array distances,
                                         const py::object& sample_weight, double margin,
                                         const std::string& reduction, double loss_scale,
                                         int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  labels = KernelArray(labels, "labels");
  distances = KernelArray(distances, "distances");
  ReducedLossArgs args;
  args.in.label_type = DTypeOfArray(labels, "labels");
  args.in.distance_type = DTypeOfArray(distances, "distances");
  CheckFloatDType(args.in.distance_type, "distances");
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  const py::array weights =
      PerRowKernelArray(WeightsOrOne(sample_weight, distances.dtype()), "sample_weight",
                        args.in.distance_type, "distances", ShapeOf(labels), "labels");
  py::array loss(distances.dtype(), std::vector<int64_t>{});
  py::array grad(distances.dtype(), shape);
  double reduction_scale = 0;
  args.in.labels = labels.data();
  args.in.distances = distances.data();
  args.in.n = CheckedElementCount(shape, distances.itemsize(), "distances");
  args.in.margin = margin;
  args.in.similar_label = similar_label;
  FillReduction(HostOperand(weights, "sample_weight"), ReductionFromName(reduction), loss_scale,
                loss.mutable_data(), &reduction_scale, &args);
  args.grad = grad.mutable_data();
  {
    py::gil_scoped_release release;
    ContrastiveLossReducedCpu(args, SerialFor);
  }
  return py::make_tuple(loss, grad, reduction_scale);
}

#if FC_WITH_CUDA
// The arrays both CUDA entry points take, checked: labels and distances of one
// shape, grad like distances, loss like distances (per-sample) or one value
// (reduced), outputs of the distances' dtype and writable.
struct CudaLossArrays {
  DeviceArray labels, distances, loss, grad;
};

CudaLossArrays ReadCudaLossArrays(const py::object& labels, const py::object& distances,
                                  const py::object& loss, const py::object& grad,
                                  const py::object& labels_dtype, const py::object& distances_dtype,
                                  bool reduced) {
  CudaLossArrays a{FromCudaArrayInterface(labels, "labels", labels_dtype),
                   FromCudaArrayInterface(distances, "distances", distances_dtype),
                   FromCudaArrayInterface(loss, "loss", distances_dtype),
                   FromCudaArrayInterface(grad, "grad", distances_dtype)};
  CheckFloatDType(a.distances.type, "distances");
  CheckSameShape("distances", a.distances.shape, "labels", a.labels.shape);
  CheckSameShape("grad", a.grad.shape, "distances", a.distances.shape);
  if (reduced) {
    if (a.loss.elements != 1) throw py::value_error("loss must hold one value");
  } else {
    CheckSameShape("loss", a.loss.shape, "distances", a.distances.shape);
  }
  if (a.loss.type != a.distances.type || a.grad.type != a.distances.type) {
    throw py::type_error("loss and grad must have the dtype of distances");
  }
  if (a.loss.readonly || a.grad.readonly) throw py::value_error("loss and grad must be writable");
  return a;
}

void ContrastiveLossCuda(const py::object& labels, const py::object& distances,
                         const py::object& loss, const py::object& grad, double margin,
                         uintptr_t stream, const py::object& labels_dtype,
                         const py::object& distances_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, false);
  const LossInputs in{a.labels.type,        a.distances.type, a.labels.data, a.distances.data,
                      a.distances.elements, margin,           similar_label};
  ThrowIfFailed(ContrastiveLossGpu(in, a.loss.data, a.grad.data, StreamOf(stream)));
}

void ContrastiveLossReducedCuda(const py::object& labels, const py::object& distances,
                                const py::object& sample_weight, const py::object& loss,
                                const py::object& grad, const py::object& reduction_scale,
                                const py::object& workspace, double margin,
                                const std::string& reduction, double loss_scale, uintptr_t stream,
                                const py::object& labels_dtype, const py::object& distances_dtype,
                                int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, true);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", distances_dtype);
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  if (!w.shape.empty()) CheckSameShape("sample_weight", w.shape, "distances", a.distances.shape);
  if (w.type != a.distances.type) {
    throw py::type_error("sample_weight must have the dtype of distances");
  }
  const int64_t n = a.distances.elements;
  CheckReducedScratch(s, ws, ContrastiveLossReducedGpuWorkspace(n), "reduced_workspace_bytes(n)");
  ReducedLossArgs args;
  args.in = LossInputs{a.labels.type, a.distances.type, a.labels.data, a.distances.data, n,
                       margin,        similar_label};
  FillReduction(DeviceOperand(w), ReductionFromName(reduction), loss_scale, a.loss.data,
                static_cast<double*>(s.data), &args);
  args.grad = a.grad.data;
  ThrowIfFailed(ContrastiveLossReducedGpu(args, ws.data, StreamOf(stream)));
}
#endif  // FC_WITH_CUDA

}  // namespace

void RegisterDistances(py::module_& m) {
  m.def("contrastive_loss_cpu", &ContrastiveLossCpuNumpy, py::arg("labels"), py::arg("distances"),
        py::arg("margin") = 1.0, py::arg("similar_label") = 1,
        "Per-sample loss and d(loss)/d(distance) on the CPU, single-threaded; returns "
        "(loss, grad).");
  m.def("contrastive_loss_reduced_cpu", &ContrastiveLossReducedCpuNumpy, py::arg("labels"),
        py::arg("distances"), py::arg("sample_weight") = py::none(), py::arg("margin") = 1.0,
        py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0, py::arg("similar_label") = 1,
        "The fused-reduction kernel on the CPU, single-threaded; returns (loss, grad, "
        "reduction_scale). reduction: 'sum', 'mean' or 'weighted_mean'; sample_weight: None, a "
        "scalar array or one weight per element, of the distances' dtype.");
#if FC_WITH_CUDA
  m.def("reduced_workspace_bytes", &ContrastiveLossReducedGpuWorkspace, py::arg("n"),
        "Device scratch bytes contrastive_loss_reduced_cuda needs for n elements.");
  m.def("contrastive_loss_reduced_cuda", &ContrastiveLossReducedCuda, py::arg("labels"),
        py::arg("distances"), py::arg("sample_weight"), py::arg("loss"), py::arg("grad"),
        py::arg("reduction_scale"), py::arg("workspace"), py::arg("margin") = 1.0,
        py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0, py::arg("stream") = 0,
        py::arg("labels_dtype") = py::none(), py::arg("distances_dtype") = py::none(),
        py::arg("similar_label") = 1,
        "The fused-reduction kernel on CUDA arrays; writes loss (one value), grad and "
        "reduction_scale (one float64). sample_weight: a 0-d array or one weight per element.");
  m.def("contrastive_loss_cuda", &ContrastiveLossCuda, py::arg("labels"), py::arg("distances"),
        py::arg("loss"), py::arg("grad"), py::arg("margin") = 1.0, py::arg("stream") = 0,
        py::arg("labels_dtype") = py::none(), py::arg("distances_dtype") = py::none(),
        py::arg("similar_label") = 1,
        "Enqueues the CUDA kernel on `stream` (a cudaStream_t as int; 0 = legacy default stream). "
        "All arrays are CUDA arrays (__cuda_array_interface__); loss and grad are written. "
        "labels_dtype/distances_dtype name the dtype when the typestr cannot (\"bfloat16\" on "
        "uint16).");
#endif  // FC_WITH_CUDA
}

}  // namespace bindings
}  // namespace fused_contrastive
