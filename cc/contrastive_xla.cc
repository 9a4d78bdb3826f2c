// XLA lowering of the op: under tf.function(jit_compile=True) and Keras'
// jit_compile (on by default when a GPU is visible) the op becomes HLO that
// XLA fuses with its neighbours. The HLO is the formula of contrastive_math.h
// itself, evaluated on XlaOps.
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf_shared.h"
#include "xla/hlo/builder/xla_builder.h"

namespace fused_contrastive {

template <>
struct ElementOps<xla::XlaOp> {
  static xla::XlaOp constant(const xla::XlaOp& like, int value) {
    return xla::ScalarLike(like, value);
  }
  // max(x, 0) differs from the scalar version's select only for NaN x, where
  // d is NaN and the loss and gradient are NaN either way.
  static xla::XlaOp positive_part(const xla::XlaOp& x) { return xla::Max(x, constant(x, 0)); }
  static xla::XlaOp divide_no_nan(const xla::XlaOp& x, const xla::XlaOp& y) {
    const xla::XlaOp zero = constant(y, 0);
    return xla::Select(xla::Eq(y, zero), zero, xla::Div(x, y));
  }
};

namespace {

// Both loss ops' inputs in the compute type: labels, distances, margin.
struct ComputeInputs {
  xla::PrimitiveType out_type;
  xla::PrimitiveType compute;
  xla::XlaOp y, d, margin;
};

// Labels in the compute type. XLA takes a bool's byte to be 0 or 1, and its
// fused code may read the low bit only; a byte such as 2 (tf.io.decode_raw)
// must still be true, as in the CPU and GPU kernels. Widening the byte and
// comparing it with 0 reads all of it.
xla::XlaOp LabelsToCompute(xla::XlaOp labels, xla::PrimitiveType label_type,
                           xla::PrimitiveType compute) {
  if (label_type == xla::PRED) {
    const xla::XlaOp bytes = xla::ConvertElementType(labels, xla::U8);
    labels = xla::Ne(bytes, xla::ScalarLike(bytes, 0));
  }
  return xla::ConvertElementType(labels, compute);
}

// Shapes and a constant margin are checked at compile time. XLA programs
// cannot raise at run time, so a margin known only then (a variable) that is
// negative or not finite becomes NaN: the loss and gradient are NaN, never a
// silently wrong number.
absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        ComputeInputs* in) {
  if (ctx->InputShape(0) != ctx->InputShape(1)) {
    return ShapeMismatch("distances", ctx->InputShape(0).DebugString(),
                         ctx->InputShape(1).DebugString());
  }
  xla::XlaOp margin = ctx->Input(margin_input);
  double margin_value;
  if (ctx->ConstantInputAsFloatScalar(margin_input, &margin_value).ok()) {
    TF_RETURN_IF_ERROR(CheckMargin(margin_value));
  } else {
    const xla::XlaOp valid =
        xla::And(xla::IsFinite(margin), xla::Ge(margin, xla::ScalarLike(margin, 0)));
    margin = xla::Select(valid, margin, xla::NanValue(ctx->builder(), xla::F64));
  }
  in->out_type = ctx->input_xla_type(1);
  in->compute =
      (in->out_type == xla::F16 || in->out_type == xla::BF16) ? xla::F32 : in->out_type;
  in->y = LabelsToCompute(ctx->Input(0), ctx->input_xla_type(0), in->compute);
  in->d = xla::ConvertElementType(ctx->Input(1), in->compute);
  in->margin = xla::ConvertElementType(margin, in->compute);
  return absl::OkStatus();
}

class ContrastiveLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 2, &in));
    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, similar_label_, &loss, &grad);
    ctx->SetOutput(0, xla::ConvertElementType(loss, in.out_type));
    ctx->SetOutput(1, xla::ConvertElementType(grad, in.out_type));
  }

 private:
  int similar_label_;
};

// Sum of every element of x (of the compute type) in float64: chunks of
// kFloatSumChunk elements summed in float32, their sums in float64. Chunks of
// at most 32 escape XLA's tree-reduction rewrite, so the chunk sums are one
// loop fusion with the loss itself, and no [n] loss array is written (XLA's
// own float32 sum of the plain formula writes and reads one).
xla::XlaOp BlockedSum(xla::XlaOp x, int64_t n, xla::PrimitiveType compute) {
  xla::XlaBuilder* builder = x.builder();
  const xla::XlaOp zero64 = xla::ConstantR0<double>(builder, 0.0);
  const xla::XlaComputation add64 = xla::CreateScalarAddComputation(xla::F64, builder);
  if (compute == xla::F64) return xla::ReduceAll(x, zero64, add64);
  const int64_t chunks = (n + kFloatSumChunk - 1) / kFloatSumChunk;
  const xla::XlaOp zero = xla::Zero(builder, compute);
  xla::PaddingConfig padding;
  auto* dim = padding.add_dimensions();
  dim->set_edge_padding_low(0);
  dim->set_edge_padding_high(chunks * kFloatSumChunk - n);
  dim->set_interior_padding(0);
  const xla::XlaOp rows = xla::Reshape(xla::Pad(xla::Reshape(x, {n}), zero, padding),
                                       {chunks, int64_t{kFloatSumChunk}});
  const xla::XlaOp chunk_sums =
      xla::Reduce(rows, zero, xla::CreateScalarAddComputation(compute, builder), {1});
  return xla::ReduceAll(xla::ConvertElementType(chunk_sums, xla::F64), zero64, add64);
}

// The reduced op, with its sums in float64 (blocked, as on CPU and GPU).
class ContrastiveLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx)
      : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &in));
    const tensorflow::TensorShape shape = ctx->InputShape(1);
    const tensorflow::TensorShape weight_shape = ctx->InputShape(2);
    const bool scalar_weight = weight_shape.dims() == 0;
    OP_REQUIRES(ctx, scalar_weight || weight_shape == shape,
                ShapeMismatch("sample_weight", shape.DebugString(), weight_shape.DebugString()));
    xla::XlaBuilder* builder = ctx->builder();
    const int64_t n = shape.num_elements();
    const xla::XlaOp w = xla::ConvertElementType(ctx->Input(2), in.compute);
    // Only kWeightedMean reads the total of per-element weights.
    xla::XlaOp weight_total = xla::ConstantR0<double>(builder, 0.0);
    if (scalar_weight) {
      weight_total = xla::ConvertElementType(w, xla::F64);
    } else if (reduction_ == Reduction::kWeightedMean) {
      weight_total = BlockedSum(w, n, in.compute);
    }
    const xla::XlaOp scale =
        reduction_scale(reduction_, xla::ConstantR0<double>(builder, static_cast<double>(n)),
                        weight_total, ctx->Input(4));

    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, similar_label_, &loss, &grad);
    const xla::XlaOp total = BlockedSum(loss * w, n, in.compute);
    ctx->SetOutput(0, xla::ConvertElementType(
                          xla::ConvertElementType(total * scale, in.compute), in.out_type));
    const xla::XlaOp scale_c = xla::ConvertElementType(scale, in.compute);
    ctx->SetOutput(1, xla::ConvertElementType(grad * (w * scale_c), in.out_type));
    ctx->SetOutput(2, scale);
  }

 private:
  Reduction reduction_;
  int similar_label_;
};

class ScaleGradientXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ScaleGradientXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    ctx->SetOutput(0, ctx->Input(0) * ctx->Input(1));
  }
};

REGISTER_XLA_OP(Name(kOpName), ContrastiveLossXlaOp);
REGISTER_XLA_OP(Name(kReducedOpName), ContrastiveLossReducedXlaOp);
REGISTER_XLA_OP(Name(kScaleOpName), ScaleGradientXlaOp);

// TensorFlow turns XLA registrations into kernels for its JIT devices once, at
// the first XLA compilation in the process, and ignores later ones. When this
// library is loaded after that (an XLA function ran before
// `import fused_contrastive`), register our JIT kernels directly, as that step
// would have.
bool JitKernelsRegistered(const std::string& backend) {
  tensorflow::NodeDef probe;
  probe.set_op("Identity");
  (*probe.mutable_attr())["T"].set_type(tensorflow::DT_FLOAT);
  return tensorflow::KernelDefAvailable(tensorflow::DeviceType(backend), probe);
}

const bool kLateJitKernelsRegistered = [] {
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (!JitKernelsRegistered(backend)) continue;
    const char* device = backend.c_str();
    RegisterKernels<ContrastiveLossXlaOp>(kOpName, device, "ContrastiveLossXlaOp", true, {});
    RegisterKernels<ContrastiveLossReducedXlaOp>(kReducedOpName, device,
                                                 "ContrastiveLossReducedXlaOp", true, {});
    RegisterKernels<ScaleGradientXlaOp>(kScaleOpName, device, "ScaleGradientXlaOp", false, {});
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
