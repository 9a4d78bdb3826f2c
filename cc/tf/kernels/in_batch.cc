// The OpKernels of the in-batch all-pairs loss: they validate, allocate and
// run the core kernels (core/in_batch) on the op's device; on GPU with
// TensorFlow's cuBLAS as their GEMM.
#include "tf/in_batch.h"
#include "core/in_batch/kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/device.h"
#include "tf/kernels/common.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

template <typename Device>
struct Launch;

template <>
struct Launch<CpuDevice> {
  static absl::Status Run(OpKernelContext* ctx, const InBatchArgs& args) {
    return RunOnCpu(ctx, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  }

  static absl::Status Reduced(OpKernelContext* ctx, const InBatchReducedArgs& args) {
    return RunOnCpu(ctx, [&](const ParallelFor& p) { return InBatchLossReducedCpu(args, p); });
  }
};

#if FC_WITH_CUDA
template <>
struct Launch<GpuDevice> {
  static absl::Status Run(OpKernelContext* ctx, const InBatchArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(ctx, InBatchLossGpuWorkspace(args), &workspace));
    return WithTfGemm(ctx, args.type, [&](const GpuGemm& gemm) {
      return InBatchLossGpu(args, workspace.data(), gemm, GpuStream(ctx));
    });
  }

  static absl::Status Reduced(OpKernelContext* ctx, const InBatchReducedArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(ctx, InBatchLossReducedGpuWorkspace(args), &workspace));
    return WithTfGemm(ctx, args.in.type, [&](const GpuGemm& gemm) {
      return InBatchLossReducedGpu(args, workspace.data(), gemm, GpuStream(ctx));
    });
  }
};
#endif

// The attrs all three in-batch kernels read, and their common inputs.
class InBatchOpBase : public OpKernel {
 public:
  explicit InBatchOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadInBatchAttrs(ctx, &attrs_));
  }

 protected:
  // Labels [B], embeddings [B, D] and margins at the positions of Io,
  // validated, with the attrs; no upstream or outputs yet.
  template <typename Io>
  absl::Status ReadInputs(OpKernelContext* ctx, InBatchArgs* args) const {
    const Tensor& labels = ctx->input(Io::kLabels);
    const Tensor& embeddings = ctx->input(Io::kEmbeddings);
    TF_RETURN_IF_ERROR(CheckInBatchShapes(labels.shape(), embeddings.shape()));
    TF_RETURN_IF_ERROR(
        CheckDispatched(FromTf(embeddings.dtype(), &args->type) && IsInBatchDType(args->type)));
    TF_RETURN_IF_ERROR(ReadScalar(ctx->input(Io::kMargin), "margin", &args->margin));
    TF_RETURN_IF_ERROR(CheckMargin(args->margin));
    TF_RETURN_IF_ERROR(
        ReadScalar(ctx->input(Io::kPositiveMargin), "positive_margin", &args->positive_margin));
    TF_RETURN_IF_ERROR(CheckMargin(args->positive_margin, "positive_margin"));
    args->labels = labels.flat<int64_t>().data();
    args->embeddings = embeddings.data();
    args->rows = embeddings.dim_size(0);
    args->dim = embeddings.dim_size(1);
    // Host memory (the registrations say so) on every device.
    const Tensor& anchors = ctx->input(Io::kAnchors);
    TF_RETURN_IF_ERROR(CheckInBatchAnchors(anchors.shape()));
    TF_RETURN_IF_ERROR(CheckedInBatchAnchors(anchors.flat<int64_t>().data(), args));
    args->distance = attrs_.distance;
    args->weighting = attrs_.weighting;
    args->miner = attrs_.miner;
    args->miner_epsilon = attrs_.miner_epsilon;
    args->max_block_rows = attrs_.max_block_rows;
    args->upstream = nullptr;
    args->loss = nullptr;
    args->grad = nullptr;
    return absl::OkStatus();
  }

 private:
  InBatchAttrs attrs_;
};

template <typename Device>
class InBatchLossOp : public InBatchOpBase {
 public:
  using InBatchOpBase::InBatchOpBase;

  void Compute(OpKernelContext* ctx) override {
    using Io = InBatchLossIo;
    InBatchArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &args));
    Tensor* loss = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(Io::kLoss, ctx->input(Io::kLabels).shape(), &loss));
    args.loss = loss->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Run(ctx, args));
  }
};

template <typename Device>
class InBatchGradOp : public InBatchOpBase {
 public:
  using InBatchOpBase::InBatchOpBase;

  void Compute(OpKernelContext* ctx) override {
    using Io = InBatchGradIo;
    InBatchArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &args));
    const Tensor& upstream = ctx->input(Io::kUpstream);
    OP_REQUIRES_OK(ctx, CheckInBatchUpstream(ctx->input(Io::kLabels).shape(), upstream.shape()));
    // Not forwarded from the embeddings: the sweep reads every row again after
    // writing the gradients of the first ones.
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(Io::kGrad, ctx->input(Io::kEmbeddings).shape(), &grad));
    Tensor* loss = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(Io::kLoss, upstream.shape(), &loss));
    args.upstream = upstream.data();
    args.grad = grad->data();
    args.loss = loss->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Run(ctx, args));
  }
};

template <typename Device>
class InBatchLossReducedOp : public InBatchOpBase {
 public:
  explicit InBatchLossReducedOp(OpKernelConstruction* ctx) : InBatchOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Io = InBatchReducedIo;
    InBatchReducedArgs args;
    OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &args.in));
    OP_REQUIRES_OK(ctx,
                   CheckInBatchWeights(ctx->input(Io::kWeights).shape(),
                                       args.in.anchor_end - args.in.anchor_begin, args.in.rows));
    OP_REQUIRES_OK(ctx, PrepareReduction<Io>(ctx, reduction_, &args.reduction));
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(Io::kGrad, ctx->input(Io::kEmbeddings).shape(), &grad));
    args.grad = grad->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Reduced(ctx, args));
  }

 private:
  Reduction reduction_;
};

}  // namespace

constexpr OpKernels kInBatchLossKernels = DeviceKernels<InBatchLossOp>("InBatchLossOp");
constexpr OpKernels kInBatchGradKernels = DeviceKernels<InBatchGradOp>("InBatchGradOp");
constexpr OpKernels kInBatchReducedKernels =
    DeviceKernels<InBatchLossReducedOp>("InBatchLossReducedOp");

}  // namespace fused_contrastive
