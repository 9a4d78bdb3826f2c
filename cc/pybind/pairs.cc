// Bindings of the "pairs" family: the loss of embedding pairs ("Embedding*" kernels), its
// backward and its fused-reduction form, on NumPy arrays and on CUDA arrays.
#include <string>
#include <vector>

#include "core/pairs/kernels.h"
#include "pybind/arrays.h"
#include "pybind/registrations.h"

namespace fused_contrastive {
namespace bindings {
namespace {

// Embeddings are [..., D]: per-row operands (labels, weights, upstream) take
// the leading axes, which messages name so.
constexpr const char* kRowsWhat = "embeddings_a.shape[:-1]";

struct PairShape {
  std::vector<int64_t> rows_shape;
  int64_t rows;
  int64_t dim;
};

// Embeddings a and b: one floating dtype, one shape of rank >= 1 whose last
// axis (the embedding) is not empty.
PairShape CheckEmbeddings(const Operand& a, const Operand& b) {
  CheckFloatDType(a.type, "embeddings_a");
  CheckSameDType("embeddings_b", b.type, "embeddings_a", a.type);
  CheckSameShape("embeddings_b", b.shape, "embeddings_a", a.shape);
  if (a.shape.empty() || a.shape.back() < 1) {
    throw py::value_error("embeddings must have rank >= 1 and a non-empty last axis, got shape " +
                          ShapeString(a.shape));
  }
  const int64_t dim = a.shape.back();
  return PairShape{std::vector<int64_t>(a.shape.begin(), a.shape.end() - 1),
                   CheckedElementCount(a.shape, 1, "embeddings_a") / dim, dim};
}

// The loss kernels' inputs: checked embeddings and one label per row.
EmbeddingInputs CheckedEmbeddingInputs(const Operand& labels, const Operand& a, const Operand& b,
                                       double margin, Distance distance, int similar_label,
                                       PairShape* pair) {
  *pair = CheckEmbeddings(a, b);
  CheckSameShape("labels", labels.shape, kRowsWhat, pair->rows_shape);
  return EmbeddingInputs{labels.type, a.type,    labels.data, a.data,        b.data,  pair->rows,
                         pair->dim,   pair->dim, margin,      similar_label, distance};
}

std::vector<int64_t> CoefficientsShape(const PairShape& pair, Distance distance) {
  std::vector<int64_t> shape = pair.rows_shape;
  shape.push_back(NumRowCoefficients(distance));
  return shape;
}

void CheckCoefficients(const Operand& coefficients, const PairShape& pair, Distance distance) {
  if (coefficients.type != DType::kFloat64) {
    throw py::type_error(std::string("coefficients must be float64, got ") +
                         DTypeName(coefficients.type));
  }
  const std::vector<int64_t> want = CoefficientsShape(pair, distance);
  if (coefficients.shape != want) {
    throw py::value_error("coefficients must have shape " + ShapeString(want) + " (" + kRowsWhat +
                          " + (" + std::to_string(want.back()) + ",) for distance '" +
                          DistanceName(distance) + "'), got " + ShapeString(coefficients.shape));
  }
}

py::tuple EmbeddingLossCpuNumpy(py::array labels, py::array embeddings_a, py::array embeddings_b,
                                double margin, const std::string& distance, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  labels = KernelArray(labels, "labels");
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  PairShape pair;
  const EmbeddingInputs in = CheckedEmbeddingInputs(
      HostOperand(labels, "labels"), HostOperand(embeddings_a, "embeddings_a"),
      HostOperand(embeddings_b, "embeddings_b"), margin, k, similar_label, &pair);
  py::array loss(embeddings_a.dtype(), pair.rows_shape);
  py::array_t<double> coefficients(CoefficientsShape(pair, k));
  void* out_loss = loss.mutable_data();
  double* out_coefficients = coefficients.mutable_data();
  {
    py::gil_scoped_release release;
    EmbeddingLossCpu(in, out_loss, out_coefficients, SerialFor);
  }
  return py::make_tuple(loss, coefficients);
}

py::tuple EmbeddingGradCpuNumpy(py::array embeddings_a, py::array embeddings_b,
                                py::array coefficients, const py::object& upstream,
                                const std::string& distance) {
  const Distance k = DistanceFromName(distance);
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  coefficients = KernelArray(coefficients, "coefficients");
  const Operand a = HostOperand(embeddings_a, "embeddings_a");
  const PairShape pair = CheckEmbeddings(a, HostOperand(embeddings_b, "embeddings_b"));
  CheckCoefficients(HostOperand(coefficients, "coefficients"), pair, k);
  const py::array up =
      PerRowKernelArray(upstream, "upstream", a.type, "embeddings_a", pair.rows_shape, kRowsWhat);
  py::array grad_a(embeddings_a.dtype(), a.shape);
  py::array grad_b(embeddings_a.dtype(), a.shape);
  const EmbeddingGradArgs args{a.type,
                               a.data,
                               embeddings_b.data(),
                               pair.rows,
                               pair.dim,
                               pair.dim,
                               k,
                               static_cast<const double*>(coefficients.data()),
                               up.data(),
                               up.ndim() == 0,
                               grad_a.mutable_data(),
                               grad_b.mutable_data()};
  {
    py::gil_scoped_release release;
    EmbeddingGradCpu(args, SerialFor);
  }
  return py::make_tuple(grad_a, grad_b);
}

py::tuple EmbeddingLossReducedCpuNumpy(py::array labels, py::array embeddings_a,
                                       py::array embeddings_b, const py::object& sample_weight,
                                       double margin, const std::string& distance,
                                       const std::string& reduction, double loss_scale,
                                       int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  const Reduction r = ReductionFromName(reduction);
  labels = KernelArray(labels, "labels");
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  PairShape pair;
  ReducedEmbeddingArgs args;
  args.in = CheckedEmbeddingInputs(
      HostOperand(labels, "labels"), HostOperand(embeddings_a, "embeddings_a"),
      HostOperand(embeddings_b, "embeddings_b"), margin, k, similar_label, &pair);
  const py::array weights =
      PerRowKernelArray(WeightsOrOne(sample_weight, embeddings_a.dtype()), "sample_weight",
                        args.in.embedding_type, "embeddings_a", pair.rows_shape, "labels");
  py::array loss(embeddings_a.dtype(), std::vector<int64_t>{});
  py::array grad_a(embeddings_a.dtype(), ShapeOf(embeddings_a));
  py::array grad_b(embeddings_a.dtype(), ShapeOf(embeddings_a));
  double reduction_scale = 0;
  FillReduction(HostOperand(weights, "sample_weight"), r, loss_scale, loss.mutable_data(),
                &reduction_scale, &args);
  args.grad_a = grad_a.mutable_data();
  args.grad_b = grad_b.mutable_data();
  {
    py::gil_scoped_release release;
    EmbeddingLossReducedCpu(args, SerialFor);
  }
  return py::make_tuple(loss, grad_a, grad_b, reduction_scale);
}

#if FC_WITH_CUDA
void EmbeddingLossCuda(const py::object& labels, const py::object& embeddings_a,
                       const py::object& embeddings_b, const py::object& loss,
                       const py::object& coefficients, double margin, const std::string& distance,
                       uintptr_t stream, const py::object& labels_dtype,
                       const py::object& embeddings_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", labels_dtype);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray out = FromCudaArrayInterface(loss, "loss", embeddings_dtype);
  const DeviceArray c = FromCudaArrayInterface(coefficients, "coefficients", py::none());
  PairShape pair;
  const EmbeddingInputs in = CheckedEmbeddingInputs(
      DeviceOperand(y), DeviceOperand(a), DeviceOperand(b), margin, k, similar_label, &pair);
  CheckDeviceOutput(out, "loss", pair.rows_shape, kRowsWhat, a.type, "embeddings_a");
  CheckCoefficients(DeviceOperand(c), pair, k);
  CheckWritable(c, "coefficients");
  ThrowIfFailed(EmbeddingLossGpu(in, out.data, static_cast<double*>(c.data), StreamOf(stream)));
}

void EmbeddingGradCuda(const py::object& embeddings_a, const py::object& embeddings_b,
                       const py::object& coefficients, const py::object& upstream,
                       const py::object& grad_a, const py::object& grad_b,
                       const std::string& distance, uintptr_t stream,
                       const py::object& embeddings_dtype) {
  const Distance k = DistanceFromName(distance);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray c = FromCudaArrayInterface(coefficients, "coefficients", py::none());
  const DeviceArray u = FromCudaArrayInterface(upstream, "upstream", embeddings_dtype);
  const DeviceArray ga = FromCudaArrayInterface(grad_a, "grad_a", embeddings_dtype);
  const DeviceArray gb = FromCudaArrayInterface(grad_b, "grad_b", embeddings_dtype);
  const PairShape pair = CheckEmbeddings(DeviceOperand(a), DeviceOperand(b));
  CheckCoefficients(DeviceOperand(c), pair, k);
  CheckPerRow("upstream", u.type, u.shape, "embeddings_a", a.type, kRowsWhat, pair.rows_shape);
  CheckDeviceOutput(ga, "grad_a", a.shape, "embeddings_a", a.type, "embeddings_a");
  CheckDeviceOutput(gb, "grad_b", a.shape, "embeddings_a", a.type, "embeddings_a");
  const EmbeddingGradArgs args{
      a.type,   a.data,          b.data,  pair.rows,
      pair.dim, pair.dim,        k,       static_cast<const double*>(c.data),
      u.data,   u.shape.empty(), ga.data, gb.data};
  ThrowIfFailed(EmbeddingGradGpu(args, StreamOf(stream)));
}

void EmbeddingLossReducedCuda(const py::object& labels, const py::object& embeddings_a,
                              const py::object& embeddings_b, const py::object& sample_weight,
                              const py::object& loss, const py::object& grad_a,
                              const py::object& grad_b, const py::object& reduction_scale,
                              const py::object& workspace, double margin,
                              const std::string& distance, const std::string& reduction,
                              double loss_scale, uintptr_t stream, const py::object& labels_dtype,
                              const py::object& embeddings_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  const Reduction r = ReductionFromName(reduction);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", labels_dtype);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", embeddings_dtype);
  const DeviceArray out = FromCudaArrayInterface(loss, "loss", embeddings_dtype);
  const DeviceArray ga = FromCudaArrayInterface(grad_a, "grad_a", embeddings_dtype);
  const DeviceArray gb = FromCudaArrayInterface(grad_b, "grad_b", embeddings_dtype);
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  PairShape pair;
  ReducedEmbeddingArgs args;
  args.in = CheckedEmbeddingInputs(DeviceOperand(y), DeviceOperand(a), DeviceOperand(b), margin, k,
                                   similar_label, &pair);
  CheckPerRow("sample_weight", w.type, w.shape, "embeddings_a", a.type, "labels", pair.rows_shape);
  CheckReducedLoss(out, a.type, "embeddings_a");
  CheckDeviceOutput(ga, "grad_a", a.shape, "embeddings_a", a.type, "embeddings_a");
  CheckDeviceOutput(gb, "grad_b", a.shape, "embeddings_a", a.type, "embeddings_a");
  CheckReducedScratch(s, ws, EmbeddingLossReducedGpuWorkspace(pair.rows),
                      "embedding_reduced_workspace_bytes(rows)");
  FillReduction(DeviceOperand(w), r, loss_scale, out.data, static_cast<double*>(s.data), &args);
  args.grad_a = ga.data;
  args.grad_b = gb.data;
  ThrowIfFailed(EmbeddingLossReducedGpu(args, ws.data, StreamOf(stream)));
}
#endif  // FC_WITH_CUDA

}  // namespace

void RegisterPairs(py::module_& m) {
  // The values per row the embedding loss writes for its gradient, by distance.
  py::dict row_coefficients;
  for (Distance k : kAllDistances) row_coefficients[DistanceName(k)] = NumRowCoefficients(k);
  m.attr("row_coefficients") = row_coefficients;
  m.def("embedding_loss_cpu", &EmbeddingLossCpuNumpy, py::arg("labels"), py::arg("embeddings_a"),
        py::arg("embeddings_b"), py::arg("margin") = 1.0, py::arg("distance") = "euclidean",
        py::arg("similar_label") = 1,
        "Per-row loss of embedding pairs a, b [..., D] (labels [...]) on the CPU, "
        "single-threaded; returns (loss [...], coefficients [..., K] float64), the coefficients "
        "embedding_grad_cpu takes. distance: 'euclidean', 'cosine' or 'manhattan'.");
  m.def("embedding_grad_cpu", &EmbeddingGradCpuNumpy, py::arg("embeddings_a"),
        py::arg("embeddings_b"), py::arg("coefficients"), py::arg("upstream"),
        py::arg("distance") = "euclidean",
        "Backward of embedding_loss_cpu: (grad_a, grad_b) for upstream d(total)/d(loss), a 0-d "
        "array or one value per row of the embeddings' dtype.");
  m.def("embedding_loss_reduced_cpu", &EmbeddingLossReducedCpuNumpy, py::arg("labels"),
        py::arg("embeddings_a"), py::arg("embeddings_b"), py::arg("sample_weight") = py::none(),
        py::arg("margin") = 1.0, py::arg("distance") = "euclidean", py::arg("reduction") = "mean",
        py::arg("loss_scale") = 1.0, py::arg("similar_label") = 1,
        "The fused-reduction kernel on embedding pairs, single-threaded; returns (loss, grad_a, "
        "grad_b, reduction_scale). sample_weight: None, a scalar array or one weight per row, of "
        "the embeddings' dtype.");
#if FC_WITH_CUDA
  m.def("embedding_reduced_workspace_bytes", &EmbeddingLossReducedGpuWorkspace, py::arg("rows"),
        "Device scratch bytes embedding_loss_reduced_cuda needs for `rows` embedding pairs.");
  m.def("embedding_loss_cuda", &EmbeddingLossCuda, py::arg("labels"), py::arg("embeddings_a"),
        py::arg("embeddings_b"), py::arg("loss"), py::arg("coefficients"), py::arg("margin") = 1.0,
        py::arg("distance") = "euclidean", py::arg("stream") = 0,
        py::arg("labels_dtype") = py::none(), py::arg("embeddings_dtype") = py::none(),
        py::arg("similar_label") = 1,
        "embedding_loss_cpu on CUDA arrays, enqueued on `stream`: writes loss [...] and "
        "coefficients [..., K] (float64). embeddings_dtype names the embeddings', loss's dtype "
        "when the typestr cannot (\"bfloat16\" on uint16).");
  m.def("embedding_grad_cuda", &EmbeddingGradCuda, py::arg("embeddings_a"), py::arg("embeddings_b"),
        py::arg("coefficients"), py::arg("upstream"), py::arg("grad_a"), py::arg("grad_b"),
        py::arg("distance") = "euclidean", py::arg("stream") = 0,
        py::arg("embeddings_dtype") = py::none(),
        "embedding_grad_cpu on CUDA arrays: writes grad_a and grad_b. upstream: a 0-d array or "
        "one value per row.");
  m.def("embedding_loss_reduced_cuda", &EmbeddingLossReducedCuda, py::arg("labels"),
        py::arg("embeddings_a"), py::arg("embeddings_b"), py::arg("sample_weight"), py::arg("loss"),
        py::arg("grad_a"), py::arg("grad_b"), py::arg("reduction_scale"), py::arg("workspace"),
        py::arg("margin") = 1.0, py::arg("distance") = "euclidean", py::arg("reduction") = "mean",
        py::arg("loss_scale") = 1.0, py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("embeddings_dtype") = py::none(), py::arg("similar_label") = 1,
        "embedding_loss_reduced_cpu on CUDA arrays: writes loss (one value), grad_a, grad_b and "
        "reduction_scale (one float64). sample_weight: a 0-d array or one weight per row.");
#endif  // FC_WITH_CUDA
}

}  // namespace bindings
}  // namespace fused_contrastive
