// The OpKernels of the loss from pair embeddings: they validate, allocate and
// run the core kernels (core/pairs) on the op's device.
#include "tf/pairs.h"
#include "core/pairs/kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/device.h"
#include "tf/kernels/common.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// The labels, embeddings and margin of a loss-computing op (positions Io),
// validated, with the attrs the kernel read at construction. A stacked pair's
// a and b are read in place, as rows 2·D apart.
template <typename Io>
absl::Status ReadEmbeddingInputs(OpKernelContext* ctx, int similar_label, Distance distance,
                                 EmbeddingInputs* in) {
  const Tensor& labels = ctx->input(Io::kLabels);
  const Tensor& a = ctx->input(Io::kEmbeddings);  // or the stacked pair
  const Tensor* b = nullptr;
  if constexpr (!Io::kStacked) b = &ctx->input(Io::kB);
  TF_RETURN_IF_ERROR(
      CheckEmbeddingShapes(labels.shape(), a.shape(), b == nullptr ? nullptr : &b->shape()));
  TF_RETURN_IF_ERROR(CheckDispatched(FromTf(labels.dtype(), &in->label_type) &&
                                     FromTf(a.dtype(), &in->embedding_type)));
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(Io::kMargin), "margin", &in->margin));
  TF_RETURN_IF_ERROR(CheckMargin(in->margin));
  in->labels = labels.data();
  in->rows = labels.NumElements();
  in->dim = a.dim_size(a.dims() - 1);
  in->similar_label = similar_label;
  in->distance = distance;
  in->a = a.data();
  in->b = b == nullptr ? StackedPairB(in->embedding_type, a.data(), in->dim) : b->data();
  in->row_stride = Io::kStacked ? 2 * in->dim : in->dim;
  return absl::OkStatus();
}

template <typename Device>
struct Launch;

template <>
struct Launch<CpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, const EmbeddingInputs& in, void* loss,
                           double* coefficients) {
    return RunOnCpu(
        ctx, [&](const ParallelFor& p) { return EmbeddingLossCpu(in, loss, coefficients, p); });
  }

  static absl::Status Grad(OpKernelContext* ctx, const EmbeddingGradArgs& args) {
    return RunOnCpu(ctx, [&](const ParallelFor& p) { return EmbeddingGradCpu(args, p); });
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedEmbeddingArgs& args) {
    return RunOnCpu(ctx, [&](const ParallelFor& p) { return EmbeddingLossReducedCpu(args, p); });
  }
};

#if FC_WITH_CUDA
template <>
struct Launch<GpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, const EmbeddingInputs& in, void* loss,
                           double* coefficients) {
    return FromGpu(EmbeddingLossGpu(in, loss, coefficients, GpuStream(ctx)));
  }

  static absl::Status Grad(OpKernelContext* ctx, const EmbeddingGradArgs& args) {
    return FromGpu(EmbeddingGradGpu(args, GpuStream(ctx)));
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedEmbeddingArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(
        AllocateWorkspace(ctx, EmbeddingLossReducedGpuWorkspace(args.in.rows), &workspace));
    return FromGpu(EmbeddingLossReducedGpu(args, workspace.data(), GpuStream(ctx)));
  }
};
#endif

template <typename Device>
class EmbeddingLossOp : public OpKernel {
 public:
  explicit EmbeddingLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Io = EmbeddingLossIo;
    EmbeddingInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs<Io>(ctx, similar_label_, distance_, &in));
    const tensorflow::TensorShape& rows = ctx->input(Io::kLabels).shape();
    tensorflow::TensorShape coefficient_shape = rows;
    coefficient_shape.AddDim(NumRowCoefficients(distance_));
    Tensor* loss = nullptr;
    Tensor* coefficients = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(Io::kLoss, rows, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(Io::kCoefficients, coefficient_shape, &coefficients));
    OP_REQUIRES_OK(
        ctx, Launch<Device>::Loss(ctx, in, loss->data(), coefficients->flat<double>().data()));
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
    using Io = EmbeddingGradIo;
    const Tensor& a = ctx->input(Io::kA);
    const Tensor& b = ctx->input(Io::kB);
    const Tensor& coefficients = ctx->input(Io::kCoefficients);
    const Tensor& upstream = ctx->input(Io::kUpstream);
    tensorflow::TensorShape rows;
    OP_REQUIRES_OK(ctx, CheckGradShapes(a.shape(), b.shape(), coefficients.shape(),
                                        upstream.shape(), distance_, &rows));
    EmbeddingGradArgs args;
    OP_REQUIRES_OK(ctx, CheckDispatched(FromTf(a.dtype(), &args.type)));
    Tensor* grad_a = nullptr;
    Tensor* grad_b = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->forward_input_or_allocate_output({Io::kA}, Io::kGradA, a.shape(), &grad_a));
    OP_REQUIRES_OK(ctx,
                   ctx->forward_input_or_allocate_output({Io::kB}, Io::kGradB, b.shape(), &grad_b));
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
    OP_REQUIRES_OK(ctx, Launch<Device>::Grad(ctx, args));
  }

 private:
  Distance distance_;
};

// Both reduced ops: on a and b (Io EmbeddingReducedIo), and on the stacked
// pair (EmbeddingPairReducedIo), whose gradient the kernel writes in the
// pair's layout.
template <typename Device, typename Io>
class EmbeddingLossReducedOp : public OpKernel {
 public:
  explicit EmbeddingLossReducedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compute(OpKernelContext* ctx) override {
    ReducedEmbeddingArgs args;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs<Io>(ctx, similar_label_, distance_, &args.in));
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", ctx->input(Io::kWeights).shape(),
                                    ctx->input(Io::kLabels).shape()));
    OP_REQUIRES_OK(ctx, PrepareReduction<Io>(ctx, reduction_, &args.reduction));
    // Each gradient in the place of its embeddings when nothing else holds them.
    const auto gradient = [ctx](int input, int output, Tensor** grad) {
      return ctx->forward_input_or_allocate_output({input}, output, ctx->input(input).shape(),
                                                   grad);
    };
    Tensor* grad_a = nullptr;
    if constexpr (Io::kStacked) {
      OP_REQUIRES_OK(ctx, gradient(Io::kPairs, Io::kGrad, &grad_a));
      args.grad_a = grad_a->data();
      args.grad_b = StackedPairB(args.in.embedding_type, args.grad_a, args.in.dim);
    } else {
      Tensor* grad_b = nullptr;
      OP_REQUIRES_OK(ctx, gradient(Io::kA, Io::kGradA, &grad_a));
      OP_REQUIRES_OK(ctx, gradient(Io::kB, Io::kGradB, &grad_b));
      args.grad_a = grad_a->data();
      args.grad_b = grad_b->data();
    }
    OP_REQUIRES_OK(ctx, Launch<Device>::Reduced(ctx, args));
  }

 private:
  Reduction reduction_;
  int similar_label_;
  Distance distance_;
};

template <typename Device>
using EmbeddingReducedOp = EmbeddingLossReducedOp<Device, EmbeddingReducedIo>;
template <typename Device>
using EmbeddingPairReducedOp = EmbeddingLossReducedOp<Device, EmbeddingPairReducedIo>;

}  // namespace

constexpr OpKernels kEmbeddingLossKernels = DeviceKernels<EmbeddingLossOp>("EmbeddingLossOp");
constexpr OpKernels kEmbeddingGradKernels = DeviceKernels<EmbeddingGradOp>("EmbeddingGradOp");
constexpr OpKernels kEmbeddingReducedKernels =
    DeviceKernels<EmbeddingReducedOp>("EmbeddingLossReducedOp");
constexpr OpKernels kEmbeddingPairReducedKernels =
    DeviceKernels<EmbeddingPairReducedOp>("EmbeddingPairLossReducedOp");

}  // namespace fused_contrastive
