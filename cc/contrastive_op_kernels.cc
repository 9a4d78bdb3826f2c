// The OpKernels of the ops defined in contrastive_ops.cc. They only validate,
// allocate and dispatch to the raw-pointer kernels.

// Eigen's ThreadPoolDevice (the op's intra-op pool) and GpuDevice (its CUDA
// stream) are only declared with these.
#define EIGEN_USE_THREADS
#if FC_WITH_CUDA
#define EIGEN_USE_GPU
#endif

#include <vector>

#include "absl/strings/str_cat.h"
#include "core/distances/kernels.h"
#include "core/pairs/kernels.h"
#include "core/in_batch/kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf_shared.h"
#include "unsupported/Eigen/CXX11/Tensor"
#if FC_WITH_CUDA
#include "xla/stream_executor/blas.h"
#include "xla/stream_executor/device_address.h"
#include "xla/stream_executor/engine_options.h"
#include "xla/stream_executor/stream.h"
#include "xla/stream_executor/stream_executor.h"
#endif

namespace fused_contrastive {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// The kernels are registered for exactly the dtypes the raw kernels support
// (RegisterKernels), so a dtype the dispatch cannot place is a build defect.
absl::Status CheckDispatched(bool supported) {
  if (supported) return absl::OkStatus();
  return absl::InternalError("contrastive loss: a kernel was registered for a dtype it lacks");
}

absl::Status ReadScalar(const Tensor& t, const char* what, double* value) {
  if (t.NumElements() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("contrastive loss: ", what,
                                                   " must be a scalar, got shape ",
                                                   t.shape().DebugString()));
  }
  *value = t.flat<double>()(0);
  return absl::OkStatus();
}

// Labels, distances (inputs 0 and 1) and the margin input, validated, plus the
// similar_label attr the kernel read at construction.
absl::Status ReadLossInputs(OpKernelContext* ctx, int margin_input, int similar_label,
                            LossInputs* in) {
  const Tensor& labels = ctx->input(0);
  const Tensor& distances = ctx->input(1);
  if (labels.shape() != distances.shape()) {
    return ShapeMismatch("distances", labels.shape().DebugString(),
                         distances.shape().DebugString());
  }
  TF_RETURN_IF_ERROR(
      CheckDispatched(FromTf(labels.dtype(), &in->label_type) &&
                      FromTf(distances.dtype(), &in->distance_type)));
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(margin_input), "margin", &in->margin));
  TF_RETURN_IF_ERROR(CheckMargin(in->margin));
  in->labels = labels.data();
  in->distances = distances.data();
  in->n = distances.NumElements();
  in->similar_label = similar_label;
  return absl::OkStatus();
}

// The embedding ops' labels (input 0), margin and attrs, for rows of `dim`
// elements of `embeddings`' dtype.
absl::Status ReadEmbeddingCommon(OpKernelContext* ctx, const Tensor& embeddings, int64_t dim,
                                 int margin_input, int similar_label, Distance distance,
                                 EmbeddingInputs* in) {
  const Tensor& labels = ctx->input(0);
  TF_RETURN_IF_ERROR(CheckDispatched(FromTf(labels.dtype(), &in->label_type) &&
                                     FromTf(embeddings.dtype(), &in->embedding_type)));
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(margin_input), "margin", &in->margin));
  TF_RETURN_IF_ERROR(CheckMargin(in->margin));
  in->labels = labels.data();
  in->rows = labels.NumElements();
  in->dim = dim;
  in->similar_label = similar_label;
  in->distance = distance;
  return absl::OkStatus();
}

// The embedding ops' labels, embeddings a and b (inputs 0-2) and margin.
absl::Status ReadEmbeddingInputs(OpKernelContext* ctx, int margin_input, int similar_label,
                                 Distance distance, EmbeddingInputs* in) {
  const Tensor& labels = ctx->input(0);
  const Tensor& a = ctx->input(1);
  const Tensor& b = ctx->input(2);
  tensorflow::TensorShape rows = a.shape();
  if (a.shape() != b.shape() || a.dims() < 1 || a.dim_size(a.dims() - 1) < 1 ||
      !rows.RemoveLastDimsWithStatus(1).ok() || labels.shape() != rows) {
    return EmbeddingShapeMismatch(labels.shape().DebugString(), a.shape().DebugString(),
                                  b.shape().DebugString());
  }
  const int64_t dim = a.dim_size(a.dims() - 1);
  TF_RETURN_IF_ERROR(ReadEmbeddingCommon(ctx, a, dim, margin_input, similar_label, distance, in));
  in->a = a.data();
  in->b = b.data();
  in->row_stride = dim;
  return absl::OkStatus();
}

// The stacked-pair op's labels [...] and pairs [..., 2, D] (inputs 0, 1) and
// margin: a and b are read in place, as rows 2·D apart.
absl::Status ReadPairInputs(OpKernelContext* ctx, int margin_input, int similar_label,
                            Distance distance, EmbeddingInputs* in) {
  const Tensor& labels = ctx->input(0);
  const Tensor& pairs = ctx->input(1);
  TF_RETURN_IF_ERROR(CheckPairShapes(labels.shape(), pairs.shape()));
  const int64_t dim = pairs.dim_size(pairs.dims() - 1);
  TF_RETURN_IF_ERROR(
      ReadEmbeddingCommon(ctx, pairs, dim, margin_input, similar_label, distance, in));
  in->a = pairs.data();
  in->b = StackedPairB(in->embedding_type, pairs.data(), dim);
  in->row_stride = 2 * dim;
  return absl::OkStatus();
}

// The in-batch ops' labels [B] and embeddings [B, D] (inputs 0 and 1) and
// margins, with the attrs the kernel read at construction.
absl::Status ReadInBatchInputs(OpKernelContext* ctx, int margin_input, Distance distance,
                               PairWeighting weighting, int64_t max_block_rows,
                               InBatchArgs* args) {
  const Tensor& labels = ctx->input(0);
  const Tensor& embeddings = ctx->input(1);
  TF_RETURN_IF_ERROR(CheckInBatchShapes(labels.shape(), embeddings.shape()));
  TF_RETURN_IF_ERROR(CheckDispatched(FromTf(embeddings.dtype(), &args->type) &&
                                     IsInBatchDType(args->type)));
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(margin_input), "margin", &args->margin));
  TF_RETURN_IF_ERROR(CheckMargin(args->margin));
  TF_RETURN_IF_ERROR(
      ReadScalar(ctx->input(margin_input + 1), "positive_margin", &args->positive_margin));
  TF_RETURN_IF_ERROR(CheckMargin(args->positive_margin, "positive_margin"));
  args->labels = labels.flat<int64_t>().data();
  args->embeddings = embeddings.data();
  args->rows = embeddings.dim_size(0);
  args->dim = embeddings.dim_size(1);
  args->distance = distance;
  args->weighting = weighting;
  args->max_block_rows = max_block_rows;
  args->upstream = nullptr;
  args->loss = nullptr;
  args->grad = nullptr;
  return absl::OkStatus();
}

}  // namespace

// Per-device launches of the kernels.
template <typename Device>
struct Launch;

template <>
struct Launch<Eigen::ThreadPoolDevice> {
  static ParallelFor Pool(OpKernelContext* ctx) {
    const Eigen::ThreadPoolDevice* device = &ctx->eigen_cpu_device();
    return [device](int64_t size, const ElementCost& cost, const ShardFn& work) {
      device->parallelFor(size,
                          Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored,
                                              cost.compute_cycles),
                          [&work](Eigen::Index begin, Eigen::Index end) { work(begin, end); });
    };
  }

  // A kernel entry on the op's pool: exhausted memory is ResourceExhausted.
  template <typename Call>
  static absl::Status Run(OpKernelContext* ctx, const Call& call) {
    const KernelOutcome outcome = RunKernel(Pool(ctx), call);
    if (outcome == KernelOutcome::kOutOfMemory) {
      return absl::ResourceExhaustedError(kKernelOutOfMemory);
    }
    return CheckDispatched(outcome == KernelOutcome::kDone);
  }

  static absl::Status Loss(OpKernelContext* ctx, const LossInputs& in, void* loss, void* grad) {
    return Run(ctx, [&](const ParallelFor& p) { return ContrastiveLossCpu(in, loss, grad, p); });
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    return Run(ctx, [&](const ParallelFor& p) { return ContrastiveLossReducedCpu(args, p); });
  }

  static absl::Status EmbeddingLoss(OpKernelContext* ctx, const EmbeddingInputs& in, void* loss,
                                    double* coefficients) {
    return Run(ctx,
               [&](const ParallelFor& p) { return EmbeddingLossCpu(in, loss, coefficients, p); });
  }

  static absl::Status EmbeddingGrad(OpKernelContext* ctx, const EmbeddingGradArgs& args) {
    return Run(ctx, [&](const ParallelFor& p) { return EmbeddingGradCpu(args, p); });
  }

  static absl::Status EmbeddingReduced(OpKernelContext* ctx, const ReducedEmbeddingArgs& args) {
    return Run(ctx, [&](const ParallelFor& p) { return EmbeddingLossReducedCpu(args, p); });
  }

  static absl::Status InBatch(OpKernelContext* ctx, const InBatchArgs& args) {
    return Run(ctx, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  }

  static absl::Status InBatchReduced(OpKernelContext* ctx, const InBatchReducedArgs& args) {
    return Run(ctx, [&](const ParallelFor& p) { return InBatchLossReducedCpu(args, p); });
  }

  // The scale is in host memory here: read it, and skip the pass when it is 1.
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    const Tensor& gradient = ctx->input(0);
    const Tensor& scale_tensor = ctx->input(1);
    double scale = 0;
    TF_RETURN_IF_ERROR(CheckDispatched(VisitDistanceDType(type, [&](auto tag) {
      using D = typename decltype(tag)::type;
      scale = Convert<double>::from(*reinterpret_cast<const D*>(scale_tensor.data()));
    })));
    if (scale == 1) {
      ctx->set_output(0, gradient);
      return absl::OkStatus();
    }
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({0}, 0, gradient.shape(), &out));
    return Run(ctx, [&](const ParallelFor& p) {
      return ScaleCpu(type, gradient.data(), scale, gradient.NumElements(), out->data(), p);
    });
  }
};

#if FC_WITH_CUDA
absl::Status FromGpu(const GpuStatus& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("contrastive loss: CUDA launch failed: ", status.error));
}

namespace se = ::stream_executor;

// Row-major c = alpha·op(a)·op(b) + beta·c on TF's cuBLAS: cuBLAS is
// column-major, where the row-major c is cᵀ = op(b)ᵀ·op(a)ᵀ, so the operands
// (and their transpose flags and leading dimensions) are swapped.
template <typename T>
absl::Status RowMajorBlasGemm(se::blas::BlasSupport* blas, se::Stream* stream, bool trans_a,
                              bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                              const void* a, int64_t lda, const void* b, int64_t ldb,
                              double beta, void* c, int64_t ldc) {
  const auto op = [](bool t) {
    return t ? se::blas::Transpose::kTranspose : se::blas::Transpose::kNoTranspose;
  };
  const T alpha_t = static_cast<T>(alpha);
  const T beta_t = static_cast<T>(beta);
  // cuBLAS takes only the pointers; the sizes are not checked.
  const se::DeviceAddressBase a_memory(const_cast<void*>(a));
  const se::DeviceAddressBase b_memory(const_cast<void*>(b));
  se::DeviceAddressBase c_memory(c);
  // No TensorFloat-32, whatever TF's global setting: the Euclidean distances
  // come from ‖e_i‖² + ‖e_j‖² − 2·s_ij, whose cancellation test
  // (gram_distance_cancels) assumes s_ij rounded as float32, not to TF32's 10
  // bits. Deterministic algorithms: the kernel promises the same bits per run.
  const se::EngineOptions options(/*require_determinism=*/true, /*allow_tf32=*/false,
                                  /*require_command_buffer=*/false);
  return blas->DoBlasGemm(stream, op(trans_b), op(trans_a), static_cast<uint64_t>(n),
                          static_cast<uint64_t>(m), static_cast<uint64_t>(k),
                          se::blas::ToDataType<T>::value, &alpha_t, b_memory,
                          static_cast<int>(ldb), a_memory, static_cast<int>(lda), &beta_t,
                          &c_memory, static_cast<int>(ldc), options,
                          se::blas::CallContext::kNone);
}

// Runs launch(gemm) with a GpuGemm of `type` on the op's stream and TF's
// cuBLAS. A GEMM's own error (an absl::Status, which GpuStatus cannot carry)
// is kept here and reported in place of the launch's.
template <typename LaunchFn>
absl::Status WithTfGemm(OpKernelContext* ctx, DType type, const LaunchFn& launch) {
  se::Stream* stream = ctx->op_device_context()->stream();
  se::blas::BlasSupport* blas = stream == nullptr ? nullptr : stream->parent()->AsBlas();
  if (blas == nullptr) {
    return absl::InternalError("in-batch contrastive loss: no cuBLAS for the op's stream");
  }
  absl::Status gemm_status;
  const GpuGemm gemm = [&](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                           double alpha, const void* a, int64_t lda, const void* b, int64_t ldb,
                           double beta, void* c, int64_t ldc) -> GpuStatus {
    const absl::Status status =
        type == DType::kFloat64
            ? RowMajorBlasGemm<double>(blas, stream, trans_a, trans_b, m, n, k, alpha, a, lda,
                                       b, ldb, beta, c, ldc)
            : RowMajorBlasGemm<float>(blas, stream, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                                      ldb, beta, c, ldc);
    if (status.ok()) return GpuStatus{};
    gemm_status = status;
    return GpuStatus{"cuBLAS GEMM failed"};
  };
  const GpuStatus launched = launch(gemm);
  if (!gemm_status.ok()) {
    return absl::InternalError(absl::StrCat("in-batch contrastive loss: cuBLAS GEMM failed: ",
                                            gemm_status.message()));
  }
  return FromGpu(launched);
}

template <>
struct Launch<Eigen::GpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, const LossInputs& in, void* loss, void* grad) {
    return FromGpu(ContrastiveLossGpu(in, loss, grad, ctx->eigen_gpu_device().stream()));
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8,
        tensorflow::TensorShape({ContrastiveLossReducedGpuWorkspace(args.in.n)}), &workspace));
    return FromGpu(ContrastiveLossReducedGpu(args, workspace.data(),
                                             ctx->eigen_gpu_device().stream()));
  }

  static absl::Status EmbeddingLoss(OpKernelContext* ctx, const EmbeddingInputs& in, void* loss,
                                    double* coefficients) {
    return FromGpu(EmbeddingLossGpu(in, loss, coefficients, ctx->eigen_gpu_device().stream()));
  }

  static absl::Status EmbeddingGrad(OpKernelContext* ctx, const EmbeddingGradArgs& args) {
    return FromGpu(EmbeddingGradGpu(args, ctx->eigen_gpu_device().stream()));
  }

  static absl::Status EmbeddingReduced(OpKernelContext* ctx, const ReducedEmbeddingArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8,
        tensorflow::TensorShape({EmbeddingLossReducedGpuWorkspace(args.in.rows)}), &workspace));
    return FromGpu(EmbeddingLossReducedGpu(args, workspace.data(),
                                           ctx->eigen_gpu_device().stream()));
  }

  static absl::Status InBatch(OpKernelContext* ctx, const InBatchArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8, tensorflow::TensorShape({InBatchLossGpuWorkspace(args)}),
        &workspace));
    return WithTfGemm(ctx, args.type, [&](const GpuGemm& gemm) {
      return InBatchLossGpu(args, workspace.data(), gemm, ctx->eigen_gpu_device().stream());
    });
  }

  static absl::Status InBatchReduced(OpKernelContext* ctx, const InBatchReducedArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8, tensorflow::TensorShape({InBatchLossReducedGpuWorkspace(args)}),
        &workspace));
    return WithTfGemm(ctx, args.in.type, [&](const GpuGemm& gemm) {
      return InBatchLossReducedGpu(args, workspace.data(), gemm,
                                   ctx->eigen_gpu_device().stream());
    });
  }

  // The scale stays on the device (reading it here would stall the stream).
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    const Tensor& gradient = ctx->input(0);
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({0}, 0, gradient.shape(), &out));
    return FromGpu(ScaleGpu(type, gradient.data(), ctx->input(1).data(), gradient.NumElements(),
                            out->data(), ctx->eigen_gpu_device().stream()));
  }
};
#endif

template <typename Device>
class ContrastiveLossOp : public OpKernel {
 public:
  explicit ContrastiveLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compute(OpKernelContext* ctx) override {
    LossInputs in;
    OP_REQUIRES_OK(ctx, ReadLossInputs(ctx, 2, similar_label_, &in));
    const tensorflow::TensorShape& shape = ctx->input(1).shape();
    // Reuse an input buffer for an output when nothing else holds it.
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, shape, &loss));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 1, shape, &grad));
    OP_REQUIRES_OK(ctx, Launch<Device>::Loss(ctx, in, loss->data(), grad->data()));
  }

 private:
  int similar_label_;
};

template <typename Device>
class ContrastiveLossReducedOp : public OpKernel {
 public:
  explicit ContrastiveLossReducedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compute(OpKernelContext* ctx) override {
    ReducedLossArgs args;
    OP_REQUIRES_OK(ctx, ReadLossInputs(ctx, 3, similar_label_, &args.in));
    const tensorflow::TensorShape& shape = ctx->input(1).shape();
    const Tensor& weights = ctx->input(2);
    args.scalar_weight = weights.dims() == 0;
    OP_REQUIRES(ctx, args.scalar_weight || weights.shape() == shape,
                ShapeMismatch("sample_weight", shape.DebugString(),
                              weights.shape().DebugString()));
    OP_REQUIRES_OK(ctx, ReadScalar(ctx->input(4), "loss_scale", &args.loss_scale));
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    Tensor* reduction_scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}), &loss));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1, 2}, 1, shape, &grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tensorflow::TensorShape({}), &reduction_scale));
    args.weights = weights.data();
    args.reduction = reduction_;
    args.loss = loss->data();
    args.grad = grad->data();
    args.reduction_scale = reduction_scale->flat<double>().data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Reduced(ctx, args));
  }

 private:
  Reduction reduction_;
  int similar_label_;
};

template <typename Device>
class ScaleGradientOp : public OpKernel {
 public:
  explicit ScaleGradientOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == 1,
                absl::InvalidArgumentError("ScaleGradient: scale must be a scalar"));
    // A branch on FromTf itself, not on a Status made from it: the compiler
    // then sees that `type` is set wherever it is read.
    DType type;
    OP_REQUIRES(ctx, FromTf(ctx->input(0).dtype(), &type), CheckDispatched(false));
    OP_REQUIRES_OK(ctx, Launch<Device>::Scale(ctx, type));
  }
};

template <typename Device>
class EmbeddingLossOp : public OpKernel {
 public:
  explicit EmbeddingLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compute(OpKernelContext* ctx) override {
    EmbeddingInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs(ctx, 3, similar_label_, distance_, &in));
    const tensorflow::TensorShape& rows = ctx->input(0).shape();
    tensorflow::TensorShape coefficient_shape = rows;
    coefficient_shape.AddDim(NumRowCoefficients(distance_));
    Tensor* loss = nullptr;
    Tensor* coefficients = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, rows, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, coefficient_shape, &coefficients));
    OP_REQUIRES_OK(ctx, Launch<Device>::EmbeddingLoss(ctx, in, loss->data(),
                                                      coefficients->flat<double>().data()));
  }

 private:
  int similar_label_;
  Distance distance_;
};

template <typename Device>
class EmbeddingGradOp : public OpKernel {
 public:
  explicit EmbeddingGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    const Tensor& coefficients = ctx->input(2);
    const Tensor& upstream = ctx->input(3);
    tensorflow::TensorShape rows = a.shape();
    OP_REQUIRES(ctx, a.shape() == b.shape() && a.dims() >= 1,
                EmbeddingShapeMismatch("(none)", a.shape().DebugString(), b.shape().DebugString()));
    OP_REQUIRES_OK(ctx, rows.RemoveLastDimsWithStatus(1));
    OP_REQUIRES_OK(ctx, CheckRowCoefficients(coefficients.shape(), rows, distance_));
    OP_REQUIRES_OK(ctx, CheckPerRow("upstream", upstream.shape(), rows));
    EmbeddingGradArgs args;
    OP_REQUIRES_OK(ctx, CheckDispatched(FromTf(a.dtype(), &args.type)));
    Tensor* grad_a = nullptr;
    Tensor* grad_b = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, a.shape(), &grad_a));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 1, b.shape(), &grad_b));
    args.a = a.data();
    args.b = b.data();
    args.rows = rows.num_elements();
    args.dim = a.dim_size(a.dims() - 1);
    args.row_stride = args.dim;
    args.distance = distance_;
    args.coefficients = coefficients.flat<double>().data();
    args.upstream = upstream.data();
    args.scalar_upstream = upstream.dims() == 0;
    args.grad_a = grad_a->data();
    args.grad_b = grad_b->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::EmbeddingGrad(ctx, args));
  }

 private:
  Distance distance_;
};

// The reduced embedding op on a, b [..., D] (inputs 1, 2; outputs grad_a,
// grad_b), or, kStacked, the pair op on the stacked pair [..., 2, D] (input
// 1; output its gradient, of the same layout): the kernel reads and writes
// the pair in place.
template <typename Device, bool kStacked>
class EmbeddingLossReducedOp : public OpKernel {
 public:
  explicit EmbeddingLossReducedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compute(OpKernelContext* ctx) override {
    // Inputs after the embeddings: sample_weight, margin, loss_scale.
    constexpr int kWeights = kStacked ? 2 : 3;
    constexpr int kGrads = kStacked ? 1 : 2;
    ReducedEmbeddingArgs args;
    if constexpr (kStacked) {
      OP_REQUIRES_OK(ctx, ReadPairInputs(ctx, kWeights + 1, similar_label_, distance_, &args.in));
    } else {
      OP_REQUIRES_OK(
          ctx, ReadEmbeddingInputs(ctx, kWeights + 1, similar_label_, distance_, &args.in));
    }
    const Tensor& weights = ctx->input(kWeights);
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weights.shape(), ctx->input(0).shape()));
    OP_REQUIRES_OK(ctx, ReadScalar(ctx->input(kWeights + 2), "loss_scale", &args.loss_scale));
    Tensor* loss = nullptr;
    Tensor* grads[kGrads] = {};
    Tensor* reduction_scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}), &loss));
    for (int i = 0; i < kGrads; ++i) {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1 + i}, 1 + i,
                                                                ctx->input(1 + i).shape(),
                                                                &grads[i]));
    }
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(1 + kGrads, tensorflow::TensorShape({}), &reduction_scale));
    args.weights = weights.data();
    args.scalar_weight = weights.dims() == 0;
    args.reduction = reduction_;
    args.loss = loss->data();
    args.grad_a = grads[0]->data();
    args.grad_b = kStacked ? StackedPairB(args.in.embedding_type, args.grad_a, args.in.dim)
                           : grads[kGrads - 1]->data();
    args.reduction_scale = reduction_scale->flat<double>().data();
    OP_REQUIRES_OK(ctx, Launch<Device>::EmbeddingReduced(ctx, args));
  }

 private:
  Reduction reduction_;
  int similar_label_;
  Distance distance_;
};

// The attrs all three in-batch kernels read.
class InBatchOpBase : public OpKernel {
 public:
  explicit InBatchOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadInBatchAttrs(ctx, &distance_, &weighting_, &max_block_rows_));
  }

 protected:
  absl::Status ReadInputs(OpKernelContext* ctx, int margin_input, InBatchArgs* args) const {
    return ReadInBatchInputs(ctx, margin_input, distance_, weighting_, max_block_rows_, args);
  }

 private:
  Distance distance_;
  PairWeighting weighting_;
  int64_t max_block_rows_;
};

template <typename Device>
class InBatchLossOp : public InBatchOpBase {
 public:
  using InBatchOpBase::InBatchOpBase;

  void Compute(OpKernelContext* ctx) override {
    InBatchArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 2, &args));
    Tensor* loss = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &loss));
    args.loss = loss->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::InBatch(ctx, args));
  }
};

template <typename Device>
class InBatchGradOp : public InBatchOpBase {
 public:
  using InBatchOpBase::InBatchOpBase;

  void Compute(OpKernelContext* ctx) override {
    InBatchArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &args));
    const Tensor& upstream = ctx->input(2);
    OP_REQUIRES(ctx, upstream.shape() == ctx->input(0).shape(),
                absl::InvalidArgumentError(absl::StrCat(
                    "in-batch contrastive loss: upstream must have the labels' shape ",
                    ctx->input(0).shape().DebugString(), ", got ",
                    upstream.shape().DebugString())));
    // Not forwarded from the embeddings: the sweep reads every row again after
    // writing the gradients of the first ones.
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(1).shape(), &grad));
    args.upstream = upstream.data();
    args.grad = grad->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::InBatch(ctx, args));
  }
};

template <typename Device>
class InBatchLossReducedOp : public InBatchOpBase {
 public:
  explicit InBatchLossReducedOp(OpKernelConstruction* ctx) : InBatchOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compute(OpKernelContext* ctx) override {
    InBatchReducedArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &args.in));
    const Tensor& weights = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weights.shape(), ctx->input(0).shape()));
    OP_REQUIRES_OK(ctx, ReadScalar(ctx->input(5), "loss_scale", &args.loss_scale));
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    Tensor* reduction_scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tensorflow::TensorShape({}), &reduction_scale));
    args.weights = weights.data();
    args.scalar_weight = weights.dims() == 0;
    args.reduction = reduction_;
    args.loss = loss->data();
    args.grad = grad->data();
    args.reduction_scale = reduction_scale->flat<double>().data();
    OP_REQUIRES_OK(ctx, Launch<Device>::InBatchReduced(ctx, args));
  }

 private:
  Reduction reduction_;
};

// The in-batch kernels, on the devices whose Launch has them.
template <typename Device>
void RegisterInBatchKernels(const char* device_type) {
  RegisterKernels<InBatchLossOp<Device>>(kInBatchOpName, device_type, "InBatchLossOp", false,
                                         {"margin", "positive_margin"}, IsInBatchDType);
  RegisterKernels<InBatchGradOp<Device>>(kInBatchGradOpName, device_type, "InBatchGradOp",
                                         false, {"margin", "positive_margin"}, IsInBatchDType);
  RegisterKernels<InBatchLossReducedOp<Device>>(
      kInBatchReducedOpName, device_type, "InBatchLossReducedOp", false,
      {"margin", "positive_margin", "loss_scale"}, IsInBatchDType);
}

template <typename Device>
void RegisterDeviceKernels(const char* device_type, bool scale_in_host_memory) {
  RegisterKernels<ContrastiveLossOp<Device>>(kOpName, device_type, "ContrastiveLossOp", true,
                                             {"margin"});
  RegisterKernels<ContrastiveLossReducedOp<Device>>(kReducedOpName, device_type,
                                                    "ContrastiveLossReducedOp", true,
                                                    {"margin", "loss_scale"});
  RegisterKernels<ScaleGradientOp<Device>>(
      kScaleOpName, device_type, "ScaleGradientOp", false,
      scale_in_host_memory ? std::vector<const char*>{"scale"} : std::vector<const char*>{});
  RegisterKernels<EmbeddingLossOp<Device>>(kEmbeddingOpName, device_type, "EmbeddingLossOp", true,
                                           {"margin"});
  RegisterKernels<EmbeddingGradOp<Device>>(kEmbeddingGradOpName, device_type, "EmbeddingGradOp",
                                           false, {});
  RegisterKernels<EmbeddingLossReducedOp<Device, false>>(kEmbeddingReducedOpName, device_type,
                                                         "EmbeddingLossReducedOp", true,
                                                         {"margin", "loss_scale"});
  RegisterKernels<EmbeddingLossReducedOp<Device, true>>(kEmbeddingPairReducedOpName, device_type,
                                                        "EmbeddingPairLossReducedOp", true,
                                                        {"margin", "loss_scale"});
}

static const bool kKernelsRegistered = [] {
  RegisterDeviceKernels<Eigen::ThreadPoolDevice>(tensorflow::DEVICE_CPU, true);
  RegisterInBatchKernels<Eigen::ThreadPoolDevice>(tensorflow::DEVICE_CPU);
#if FC_WITH_CUDA
  RegisterDeviceKernels<Eigen::GpuDevice>(tensorflow::DEVICE_GPU, false);
  RegisterInBatchKernels<Eigen::GpuDevice>(tensorflow::DEVICE_GPU);
#endif
  return true;
}();

}  // namespace fused_contrastive
