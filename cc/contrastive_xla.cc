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
};

namespace {

// Both loss ops' inputs in the compute type: labels, distances, margin.
struct ComputeInputs {
  xla::PrimitiveType out_type;
  xla::PrimitiveType compute;
  xla::XlaOp y, d, margin;
};

// Shapes and a constant margin are checked here: XLA programs cannot fail at
// run time (the Python layer has already checked a number margin).
absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        ComputeInputs* in) {
  if (ctx->InputShape(0) != ctx->InputShape(1)) {
    return ShapeMismatch("distances", ctx->InputShape(0).DebugString(),
                         ctx->InputShape(1).DebugString());
  }
  double margin_value;
  if (ctx->ConstantInputAsFloatScalar(margin_input, &margin_value).ok()) {
    TF_RETURN_IF_ERROR(CheckMargin(margin_value));
  }
  in->out_type = ctx->input_xla_type(1);
  in->compute =
      (in->out_type == xla::F16 || in->out_type == xla::BF16) ? xla::F32 : in->out_type;
  in->y = xla::ConvertElementType(ctx->Input(0), in->compute);
  in->d = xla::ConvertElementType(ctx->Input(1), in->compute);
  in->margin = xla::ConvertElementType(ctx->Input(margin_input), in->compute);
  return absl::OkStatus();
}

class ContrastiveLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 2, &in));
    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, &loss, &grad);
    ctx->SetOutput(0, xla::ConvertElementType(loss, in.out_type));
    ctx->SetOutput(1, xla::ConvertElementType(grad, in.out_type));
  }
};

// The reduced op, with its sums in float64 like the CPU and GPU kernels.
class ContrastiveLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx)
      : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    ComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &in));
    const tensorflow::TensorShape weight_shape = ctx->InputShape(2);
    const bool scalar_weight = weight_shape.dims() == 0;
    OP_REQUIRES(ctx, scalar_weight || weight_shape == ctx->InputShape(1),
                ShapeMismatch("sample_weight", ctx->InputShape(0).DebugString(),
                              weight_shape.DebugString()));
    xla::XlaBuilder* builder = ctx->builder();
    const xla::XlaComputation add = xla::CreateScalarAddComputation(xla::F64, builder);
    const xla::XlaOp zero = xla::ConstantR0<double>(builder, 0.0);
    const auto sum = [&](xla::XlaOp x) {
      return xla::ReduceAll(xla::ConvertElementType(x, xla::F64), zero, add);
    };
    const xla::XlaOp w = xla::ConvertElementType(ctx->Input(2), in.compute);
    const xla::XlaOp w64 = xla::ConvertElementType(w, xla::F64);

    xla::XlaOp divisor = xla::ConstantR0<double>(builder, 1.0);
    if (reduction_ == Reduction::kMean) {
      divisor = xla::ConstantR0<double>(builder, ctx->InputShape(1).num_elements());
    } else if (reduction_ == Reduction::kWeightedMean) {
      divisor = scalar_weight ? w64 : sum(w);
    }
    const xla::XlaOp inverse =
        xla::Select(xla::Eq(divisor, zero), zero, xla::Div(ctx->Input(4), divisor));

    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, &loss, &grad);
    const xla::XlaOp total = sum(xla::ConvertElementType(loss, xla::F64) * w64);
    ctx->SetOutput(0, xla::ConvertElementType(
                          xla::ConvertElementType(total * inverse, in.compute), in.out_type));
    const xla::XlaOp grad_scale = xla::ConvertElementType(inverse, in.compute);
    ctx->SetOutput(1, xla::ConvertElementType(grad * (w * grad_scale), in.out_type));
    ctx->SetOutput(2, inverse);
  }

 private:
  Reduction reduction_;
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
// would have: the op's full type lists on every XLA backend.
bool JitKernelsRegistered(const std::string& backend) {
  tensorflow::NodeDef probe;
  probe.set_op("Identity");
  (*probe.mutable_attr())["T"].set_type(tensorflow::DT_FLOAT);
  return tensorflow::KernelDefAvailable(tensorflow::DeviceType(backend), probe);
}

template <typename Op>
tensorflow::OpKernel* CreateXla(tensorflow::OpKernelConstruction* ctx) {
  return new Op(ctx);
}

const bool kLateJitKernelsRegistered = [] {
  std::vector<tensorflow::DataType> labels, distances;
  for (DType t : kAllDTypes) {
    labels.push_back(ToTf(t));
    if (IsDistanceDType(t)) distances.push_back(ToTf(t));
  }
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (!JitKernelsRegistered(backend)) continue;
    const auto builder = [&](const char* op) {
      tensorflow::KernelDefBuilder b(op);
      b.Device(backend.c_str()).TypeConstraint("T", distances);
      if (op != kScaleOpName) b.TypeConstraint("Tlabels", labels);
      return b.Build();
    };
    tensorflow::kernel_factory::OpKernelRegistrar(builder(kOpName), "ContrastiveLossXlaOp",
                                                  CreateXla<ContrastiveLossXlaOp>);
    tensorflow::kernel_factory::OpKernelRegistrar(builder(kReducedOpName),
                                                  "ContrastiveLossReducedXlaOp",
                                                  CreateXla<ContrastiveLossReducedXlaOp>);
    tensorflow::kernel_factory::OpKernelRegistrar(builder(kScaleOpName), "ScaleGradientXlaOp",
                                                  CreateXla<ScaleGradientXlaOp>);
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
