// XLA lowerings of the loss on distances: under tf.function(jit_compile=True)
// and Keras' jit_compile the ops become HLO that XLA fuses with their
// neighbours, the formula of core/common/formula.h itself on XlaOps, on every
// backend.
#include "tf/distances.h"
#include "core/common/formula.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla/hlo.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::TensorShape;

// The loss ops' inputs in the compute type: labels, distances, margin.
struct ComputeInputs {
  xla::PrimitiveType out_type;
  xla::PrimitiveType compute;
  xla::XlaOp y, d, margin;
};

// At the positions of Io (either loss op).
template <typename Io>
absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, ComputeInputs* in) {
  TF_RETURN_IF_ERROR(
      CheckDistanceShapes(ctx->InputShape(Io::kLabels), ctx->InputShape(Io::kDistances)));
  in->out_type = ctx->input_xla_type(Io::kDistances);
  in->compute = XlaComputeType(in->out_type);
  in->d = xla::ConvertElementType(ctx->Input(Io::kDistances), in->compute);
  return ReadLabelsAndMargin(ctx, Io::kLabels, Io::kMargin, in->compute, &in->y, &in->margin);
}

class ContrastiveLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = ContrastiveLossIo;
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, similar_label_, &loss, &grad);
    ctx->SetOutput(Io::kLoss, xla::ConvertElementType(loss, in.out_type));
    ctx->SetOutput(Io::kGrad, xla::ConvertElementType(grad, in.out_type));
  }

 private:
  int similar_label_;
};

// The reduced op, with its sums in float64 (blocked, as on CPU and GPU).
class ContrastiveLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = ContrastiveLossReducedIo;
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
    const TensorShape shape = ctx->InputShape(Io::kDistances);
    const TensorShape weight_shape = ctx->InputShape(Io::kWeights);
    OP_REQUIRES_OK(ctx, CheckDistanceWeights(weight_shape, shape));
    const bool scalar_weight = weight_shape.dims() == 0;
    const int64_t n = shape.num_elements();
    const xla::XlaOp w = xla::ConvertElementType(ctx->Input(Io::kWeights), in.compute);
    const xla::XlaOp scale = ReductionScale(ctx, reduction_, w, scalar_weight, n, Io::kLossScale);

    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, similar_label_, &loss, &grad);
    ctx->SetOutput(Io::kLoss, ReducedLoss(BlockedSum(loss * w, n, in.compute), scale, in.compute,
                                          in.out_type));
    const xla::XlaOp scale_c = xla::ConvertElementType(scale, in.compute);
    ctx->SetOutput(Io::kGrad, xla::ConvertElementType(grad * (w * scale_c), in.out_type));
    ctx->SetOutput(Io::kReductionScale, scale);
  }

 private:
  Reduction reduction_;
  int similar_label_;
};

class ScaleGradientXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ScaleGradientXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = ScaleGradientIo;
    ctx->SetOutput(Io::kScaled, ctx->Input(Io::kGradient) * ctx->Input(Io::kScale));
  }
};

}  // namespace

constexpr XlaKernels kContrastiveLossXla = {{"ContrastiveLossXlaOp", Create<ContrastiveLossXlaOp>},
                                            {}};
constexpr XlaKernels kContrastiveLossReducedXla = {
    {"ContrastiveLossReducedXlaOp", Create<ContrastiveLossReducedXlaOp>}, {}};
constexpr XlaKernels kScaleGradientXla = {{"ScaleGradientXlaOp", Create<ScaleGradientXlaOp>}, {}};

}  // namespace fused_contrastive
