// pybind11 access to the raw kernels, so they can be tested and benchmarked
// where TensorFlow is absent (the GPU check machine has none).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <vector>

#include "contrastive_kernels.h"

namespace py = pybind11;

namespace fused_contrastive {
namespace {

DType DTypeOfArray(const py::array& a, const char* what) {
  const std::string name = py::str(a.dtype().attr("name"));
  for (DType t : kAllDTypes) {
    if (name == DTypeName(t)) return t;
  }
  throw py::type_error(std::string(what) + ": unsupported dtype " + name);
}

py::tuple ContrastiveLossCpuNumpy(py::array labels, py::array distances, double margin) {
  if (!IsValidMargin(margin)) {
    throw py::value_error("margin must be finite and non-negative, got " + std::to_string(margin));
  }
  labels = py::array::ensure(labels, py::array::c_style);
  distances = py::array::ensure(distances, py::array::c_style);
  const DType label_type = DTypeOfArray(labels, "labels");
  const DType distance_type = DTypeOfArray(distances, "distances");
  if (!IsDistanceDType(distance_type)) {
    throw py::type_error(std::string("distances must be float16, bfloat16, float32 or float64, got ") +
                         DTypeName(distance_type));
  }
  std::vector<py::ssize_t> shape(distances.shape(), distances.shape() + distances.ndim());
  if (labels.ndim() != distances.ndim() ||
      !std::equal(shape.begin(), shape.end(), labels.shape())) {
    throw py::value_error("labels and distances must have the same shape, got labels " +
                          std::string(py::str(py::tuple(labels.attr("shape")))) + " and distances " +
                          std::string(py::str(py::tuple(distances.attr("shape")))));
  }
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

}  // namespace
}  // namespace fused_contrastive

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Raw fused contrastive-loss kernels on NumPy arrays (no TensorFlow needed).";
  m.def("contrastive_loss_cpu", &fused_contrastive::ContrastiveLossCpuNumpy, py::arg("labels"),
        py::arg("distances"), py::arg("margin") = 1.0,
        "Per-sample loss and d(loss)/d(distance) on the CPU, single-threaded; returns (loss, grad).");
}
