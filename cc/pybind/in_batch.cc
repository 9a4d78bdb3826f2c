// Bindings of the "in_batch" family: the all-pairs loss of a batch of embeddings, per anchor
// and with the Keras reduction fused in, on NumPy arrays (CPU) and CUDA arrays (GPU).
#include <cmath>
#include <string>
#include <vector>

#include "core/in_batch/kernels.h"
#include "pybind/arrays.h"
#include "pybind/registrations.h"

namespace fused_contrastive {
namespace bindings {
namespace {

// The in-batch entries' options (host and CUDA alike): InBatchArgs with the
// margins, distance, pair weighting and block cap set, no operand yet.
InBatchArgs InBatchOptions(double margin, double positive_margin, const std::string& distance,
                           const std::string& pair_weighting, int64_t max_block_rows) {
  CheckMargin(margin);
  CheckMargin(positive_margin, "positive_margin");
  if (max_block_rows < 0) {
    throw py::value_error("max_block_rows must be >= 0 (0: the kernel's choice), got " +
                          std::to_string(max_block_rows));
  }
  const Distance k = DistanceFromName(distance);
  if (!IsInBatchDistance(k)) {
    throw py::value_error("the in-batch loss has no '" + distance + "' distance");
  }
  PairWeighting weighting;
  if (!ParsePairWeighting(pair_weighting, &weighting)) {
    throw py::value_error("pair_weighting must be one of " +
                          QuotedNames(kAllPairWeightings, PairWeightingName) + ", got '" +
                          pair_weighting + "'");
  }
  InBatchArgs args{};
  args.type = DType::kFloat32;
  args.margin = margin;
  args.positive_margin = positive_margin;
  args.distance = k;
  args.weighting = weighting;
  args.max_block_rows = max_block_rows;
  return args;
}

// The miner: None, or the name of one in kAllMiners but kNone; epsilon
// finite and >= 0 (read by multi_similarity only).
void SetMiner(const py::object& miner, double epsilon, InBatchArgs* args) {
  args->miner = Miner::kNone;
  if (!miner.is_none()) {
    std::string valid = "None";
    for (Miner m : kAllMiners) {
      if (m != Miner::kNone) valid += std::string(", '") + MinerName(m) + "'";
      if (m != Miner::kNone && py::isinstance<py::str>(miner) &&
          miner.cast<std::string>() == MinerName(m)) {
        args->miner = m;
      }
    }
    if (args->miner == Miner::kNone) {
      throw py::value_error("miner must be one of " + valid + ", got " +
                            py::repr(miner).cast<std::string>());
    }
  }
  if (!std::isfinite(epsilon) || epsilon < 0) {
    throw py::value_error("miner_epsilon must be finite and >= 0, got " + std::to_string(epsilon));
  }
  args->miner_epsilon = epsilon;
}

// The anchors: None for all rows, else (begin, end) or (begin, end, grad,
// used) (InBatchArgs). After the embeddings have set the rows.
void SetAnchors(const py::object& anchors, InBatchArgs* args) {
  std::vector<int64_t> range = {0, args->rows, args->rows, args->rows};
  if (!anchors.is_none()) {
    const auto given = anchors.cast<std::vector<int64_t>>();
    if (given.size() != 2 && given.size() != 4) {
      throw py::value_error("anchors must be (begin, end) or (begin, end, grad, used)");
    }
    std::copy(given.begin(), given.end(), range.begin());
  }
  const std::string problem = SetInBatchAnchors(range.data(), args);
  if (!problem.empty()) throw py::value_error(problem);
}

// Embeddings [B, D] of float32 or float64: sets args' type, rows and dim.
void CheckInBatchEmbeddings(const Operand& embeddings, InBatchArgs* args) {
  if (!IsInBatchDType(embeddings.type)) {
    throw py::type_error(std::string("embeddings must be float32 or float64, got ") +
                         DTypeName(embeddings.type));
  }
  if (embeddings.shape.size() != 2) {
    throw py::value_error("embeddings must have shape [B, D], got " +
                          ShapeString(embeddings.shape));
  }
  args->type = embeddings.type;
  args->embeddings = embeddings.data;
  args->rows = embeddings.shape[0];
  args->dim = embeddings.shape[1];
}

// Class labels [B]: int64, or int32 too where the caller widens them (the
// kernels read int64).
void CheckInBatchLabels(const Operand& labels, const InBatchArgs& args, bool int32_ok) {
  if (labels.type != DType::kInt64 && !(int32_ok && labels.type == DType::kInt32)) {
    throw py::type_error(std::string("labels must be ") + (int32_ok ? "int32 or int64" : "int64") +
                         " class ids, got " + DTypeName(labels.type));
  }
  CheckSameShape("labels", labels.shape, "embeddings.shape[:1]", {args.rows});
}

// The upstream gradient: [B], of the embeddings' dtype.
void CheckInBatchUpstream(const Operand& upstream, const InBatchArgs& args) {
  CheckSameDType("upstream", upstream.type, "embeddings", args.type);
  CheckSameShape("upstream", upstream.shape, "embeddings.shape[:1]", {args.rows});
}

// The in-batch kernels' checked host arguments: embeddings [B, D]
// float32/float64, class labels [B] (made int64), margins and names; the
// upstream gradient, when given, [B] of the embeddings' dtype.
struct InBatchOperands {
  InBatchArgs args;
  py::array labels;
  py::array embeddings;
  py::array upstream;
};

InBatchOperands CheckedInBatchArgs(const py::object& labels, const py::object& embeddings,
                                   const py::object& upstream, double margin,
                                   double positive_margin, const std::string& distance,
                                   const std::string& pair_weighting, int64_t max_block_rows,
                                   const py::object& anchors, const py::object& miner,
                                   double miner_epsilon) {
  InBatchOperands out;
  out.args = InBatchOptions(margin, positive_margin, distance, pair_weighting, max_block_rows);
  SetMiner(miner, miner_epsilon, &out.args);
  out.embeddings = KernelArray(embeddings, "embeddings");
  CheckInBatchEmbeddings(HostOperand(out.embeddings, "embeddings"), &out.args);
  SetAnchors(anchors, &out.args);
  out.labels = KernelArray(labels, "labels");
  CheckInBatchLabels(HostOperand(out.labels, "labels"), out.args, /*int32_ok=*/true);
  out.labels = KernelArray(out.labels.attr("astype")("int64"), "labels");
  out.args.labels = static_cast<const int64_t*>(out.labels.data());
  if (!upstream.is_none()) {
    out.upstream = KernelArray(upstream, "upstream");
    CheckInBatchUpstream(HostOperand(out.upstream, "upstream"), out.args);
    out.args.upstream = out.upstream.data();
  }
  return out;
}

py::tuple InBatchLossCpuNumpy(const py::object& labels, const py::object& embeddings,
                              const py::object& upstream, double margin, double positive_margin,
                              const std::string& distance, const std::string& pair_weighting,
                              int64_t max_block_rows, const py::object& anchors,
                              const py::object& miner, double miner_epsilon) {
  InBatchOperands in =
      CheckedInBatchArgs(labels, embeddings, upstream, margin, positive_margin, distance,
                         pair_weighting, max_block_rows, anchors, miner, miner_epsilon);
  py::array loss(in.embeddings.dtype(), std::vector<int64_t>{in.args.rows});
  py::object grad = py::none();
  in.args.loss = loss.mutable_data();
  if (!upstream.is_none()) {
    py::array g(in.embeddings.dtype(), ShapeOf(in.embeddings));
    in.args.grad = g.mutable_data();
    grad = g;
  }
  {
    py::gil_scoped_release release;
    InBatchLossCpu(in.args, SerialFor);
  }
  return py::make_tuple(loss, grad);
}

#if FC_WITH_CUDA
// The in-batch CUDA entries' embeddings and labels (int64: the kernels read
// them in place), checked as the CPU entry checks its own.
InBatchArgs CheckedInBatchCudaArgs(const py::object& labels, const py::object& embeddings,
                                   double margin, double positive_margin,
                                   const std::string& distance, const std::string& pair_weighting,
                                   int64_t max_block_rows, const py::object& anchors,
                                   const py::object& miner, double miner_epsilon) {
  InBatchArgs args =
      InBatchOptions(margin, positive_margin, distance, pair_weighting, max_block_rows);
  SetMiner(miner, miner_epsilon, &args);
  const DeviceArray e = FromCudaArrayInterface(embeddings, "embeddings", py::none());
  CheckInBatchEmbeddings(DeviceOperand(e), &args);
  SetAnchors(anchors, &args);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", py::none());
  CheckInBatchLabels(DeviceOperand(y), args, /*int32_ok=*/false);
  args.labels = static_cast<const int64_t*>(y.data);
  return args;
}

// Workspace sizes without arrays, from what they depend on (the cosine
// distance's includes a scaled copy of the embeddings: dim counts).
InBatchArgs InBatchSizeArgs(int64_t rows, const std::string& dtype, int64_t max_block_rows,
                            int64_t dim, const std::string& distance) {
  if (rows < 0) throw py::value_error("rows must be non-negative");
  if (dim < 0) throw py::value_error("dim must be non-negative");
  const DType type = DTypeFromName(dtype, "dtype");
  if (!IsInBatchDType(type)) throw py::type_error("dtype must be float32 or float64");
  InBatchArgs args = InBatchOptions(1.0, 0.0, distance, "uniform", max_block_rows);
  args.type = type;
  args.rows = rows;
  args.dim = dim;
  args.anchor_begin = 0;
  args.anchor_end = args.grad_rows = args.used_rows = rows;
  return args;
}

int64_t InBatchWorkspaceBytes(int64_t rows, const std::string& dtype, int64_t max_block_rows,
                              int64_t dim, const std::string& distance) {
  return InBatchLossGpuWorkspace(InBatchSizeArgs(rows, dtype, max_block_rows, dim, distance));
}

int64_t InBatchReducedWorkspaceBytes(int64_t rows, const std::string& dtype, int64_t max_block_rows,
                                     int64_t dim, const std::string& distance) {
  InBatchReducedArgs args{};
  args.in = InBatchSizeArgs(rows, dtype, max_block_rows, dim, distance);
  return InBatchLossReducedGpuWorkspace(args);
}

// The kernels' GEMMs come from TiledGemmGpu: this module has no cuBLAS.
void InBatchLossCuda(const py::object& labels, const py::object& embeddings,
                     const py::object& upstream, const py::object& loss, const py::object& grad,
                     const py::object& workspace, double margin, double positive_margin,
                     const std::string& distance, const std::string& pair_weighting,
                     int64_t max_block_rows, const py::object& anchors, const py::object& miner,
                     double miner_epsilon, uintptr_t stream) {
  InBatchArgs args =
      CheckedInBatchCudaArgs(labels, embeddings, margin, positive_margin, distance, pair_weighting,
                             max_block_rows, anchors, miner, miner_epsilon);
  const std::vector<int64_t> rows_shape{args.rows};
  const std::vector<int64_t> shape{args.rows, args.dim};
  if (upstream.is_none() != grad.is_none()) {
    throw py::value_error("upstream and grad must be given together");
  }
  if (loss.is_none() && grad.is_none()) {
    throw py::value_error("nothing to compute: loss and grad are both None");
  }
  if (!loss.is_none()) {
    const DeviceArray l = FromCudaArrayInterface(loss, "loss", py::none());
    CheckDeviceOutput(l, "loss", rows_shape, "embeddings.shape[:1]", args.type, "embeddings");
    args.loss = l.data;
  }
  if (!upstream.is_none()) {
    const DeviceArray u = FromCudaArrayInterface(upstream, "upstream", py::none());
    CheckInBatchUpstream(DeviceOperand(u), args);
    const DeviceArray g = FromCudaArrayInterface(grad, "grad", py::none());
    CheckDeviceOutput(g, "grad", shape, "embeddings", args.type, "embeddings");
    args.upstream = u.data;
    args.grad = g.data;
  }
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  CheckWorkspace(ws, InBatchLossGpuWorkspace(args),
                 "in_batch_workspace_bytes(rows, dtype, max_block_rows, dim, distance)");
  void* s = StreamOf(stream);
  ThrowIfFailed(InBatchLossGpu(args, ws.data, TiledGemmGpu(args.type, s), s));
}

void InBatchLossReducedCuda(const py::object& labels, const py::object& embeddings,
                            const py::object& sample_weight, const py::object& loss,
                            const py::object& grad, const py::object& reduction_scale,
                            const py::object& workspace, double margin, double positive_margin,
                            const std::string& distance, const std::string& pair_weighting,
                            const std::string& reduction, double loss_scale, int64_t max_block_rows,
                            const py::object& anchors, const py::object& miner,
                            double miner_epsilon, uintptr_t stream) {
  InBatchReducedArgs args;
  args.in = CheckedInBatchCudaArgs(labels, embeddings, margin, positive_margin, distance,
                                   pair_weighting, max_block_rows, anchors, miner, miner_epsilon);
  const Reduction r = ReductionFromName(reduction);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", py::none());
  const DeviceArray l = FromCudaArrayInterface(loss, "loss", py::none());
  const DeviceArray g = FromCudaArrayInterface(grad, "grad", py::none());
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  CheckPerRow("sample_weight", w.type, w.shape, "embeddings", args.in.type, "the anchors",
              {args.in.anchor_end - args.in.anchor_begin});
  CheckReducedLoss(l, args.in.type, "embeddings");
  CheckDeviceOutput(g, "grad", {args.in.rows, args.in.dim}, "embeddings", args.in.type,
                    "embeddings");
  CheckReducedScratch(s, ws, InBatchLossReducedGpuWorkspace(args),
                      "in_batch_reduced_workspace_bytes(rows, dtype, max_block_rows, dim, "
                      "distance)");
  FillReduction(DeviceOperand(w), r, loss_scale, l.data, static_cast<double*>(s.data), &args);
  args.grad = g.data;
  void* st = StreamOf(stream);
  ThrowIfFailed(InBatchLossReducedGpu(args, ws.data, TiledGemmGpu(args.in.type, st), st));
}
#endif  // FC_WITH_CUDA

}  // namespace

void RegisterInBatch(py::module_& m) {
  // The weightings' names, for the TF-free GPU check and the fuzzer.
  py::tuple weightings(std::size(kAllPairWeightings));
  for (size_t i = 0; i < std::size(kAllPairWeightings); ++i) {
    weightings[i] = PairWeightingName(kAllPairWeightings[i]);
  }
  m.attr("PAIR_WEIGHTINGS") = weightings;
  // The miners' names (None for kNone), for the fuzzer.
  py::list miners;
  for (Miner miner : kAllMiners) {
    if (miner != Miner::kNone) miners.append(MinerName(miner));
  }
  m.attr("MINERS") = py::tuple(miners);
  m.def("in_batch_loss_cpu", &InBatchLossCpuNumpy, py::arg("labels"), py::arg("embeddings"),
        py::arg("upstream") = py::none(), py::arg("margin") = 1.0, py::arg("positive_margin") = 0.0,
        py::arg("distance") = "euclidean", py::arg("pair_weighting") = "uniform",
        py::arg("max_block_rows") = 0, py::arg("anchors") = py::none(),
        py::arg("miner") = py::none(), py::arg("miner_epsilon") = 0.1,
        "The in-batch all-pairs loss of embeddings [B, D] with class labels [B] on the CPU, "
        "single-threaded; returns (loss [B], grad [B, D] or None). grad is d(sum(upstream * "
        "loss))/d(embeddings), computed when upstream ([B], the embeddings' dtype) is given. "
        "anchors: None (every row), (begin, end) or (begin, end, grad, used): only rows "
        "begin..end-1 are anchors, the others below `used` (default: all rows) partners (loss 0, "
        "gradient from their pairs with anchors, 0 from row `grad` on), the rest unused (loss "
        "and gradient 0). miner: None, 'batch_hard' or 'multi_similarity' (with miner_epsilon).");
  m.def(
      "in_batch_cpu_isa", &InBatchCpuIsa,
      "The instruction set the in-batch CPU kernel runs with here: 'avx512', 'avx2' or 'generic'.");
  m.def("in_batch_cpu_builds", &InBatchCpuBuilds,
        "The in-batch CPU kernel's builds this CPU can run, best first.");
#if FC_WITH_CUDA
  m.def("in_batch_workspace_bytes", &InBatchWorkspaceBytes, py::arg("rows"),
        py::arg("dtype") = "float32", py::arg("max_block_rows") = 0, py::arg("dim") = 0,
        py::arg("distance") = "euclidean",
        "Device scratch bytes in_batch_loss_cuda needs for `rows` embeddings of `dtype` "
        "(cosine: of `dim` values each).");
  m.def("in_batch_reduced_workspace_bytes", &InBatchReducedWorkspaceBytes, py::arg("rows"),
        py::arg("dtype") = "float32", py::arg("max_block_rows") = 0, py::arg("dim") = 0,
        py::arg("distance") = "euclidean",
        "Device scratch bytes in_batch_loss_reduced_cuda needs for `rows` embeddings of `dtype` "
        "(cosine: of `dim` values each).");
  m.def("in_batch_loss_cuda", &InBatchLossCuda, py::arg("labels"), py::arg("embeddings"),
        py::arg("upstream"), py::arg("loss"), py::arg("grad"), py::arg("workspace"),
        py::arg("margin") = 1.0, py::arg("positive_margin") = 0.0,
        py::arg("distance") = "euclidean", py::arg("pair_weighting") = "uniform",
        py::arg("max_block_rows") = 0, py::arg("anchors") = py::none(),
        py::arg("miner") = py::none(), py::arg("miner_epsilon") = 0.1, py::arg("stream") = 0,
        "in_batch_loss_cpu on CUDA arrays (labels int64 [B], embeddings [B, D]), enqueued on "
        "`stream`, with a plain tiled GEMM in place of cuBLAS: writes loss [B] unless None and, "
        "with upstream [B], grad [B, D] (upstream and grad are None together).");
  m.def(
      "in_batch_loss_reduced_cuda", &InBatchLossReducedCuda, py::arg("labels"),
      py::arg("embeddings"), py::arg("sample_weight"), py::arg("loss"), py::arg("grad"),
      py::arg("reduction_scale"), py::arg("workspace"), py::arg("margin") = 1.0,
      py::arg("positive_margin") = 0.0, py::arg("distance") = "euclidean",
      py::arg("pair_weighting") = "uniform", py::arg("reduction") = "mean",
      py::arg("loss_scale") = 1.0, py::arg("max_block_rows") = 0, py::arg("anchors") = py::none(),
      py::arg("miner") = py::none(), py::arg("miner_epsilon") = 0.1, py::arg("stream") = 0,
      "The in-batch loss with the Keras reduction fused in, on CUDA arrays: writes loss (one "
      "value), grad [B, D] and reduction_scale (one float64). sample_weight: a 0-d array or "
      "one weight per anchor, of the embeddings' dtype; anchors and miner as in_batch_loss_cuda.");
#endif  // FC_WITH_CUDA
}

}  // namespace bindings
}  // namespace fused_contrastive
