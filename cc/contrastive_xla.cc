// XLA lowering of the op: under tf.function(jit_compile=True) and Keras'
// jit_compile (on by default when a GPU is visible) the op becomes HLO that
// XLA fuses with its neighbours. The HLO is the formula of contrastive_math.h
// itself, evaluated on XlaOps.
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/lib/constants.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf_dtypes.h"
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

class ContrastiveLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit ContrastiveLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    const tensorflow::TensorShape labels_shape = ctx->InputShape(0);
    const tensorflow::TensorShape distances_shape = ctx->InputShape(1);
    OP_REQUIRES(ctx, labels_shape == distances_shape,
                absl::InvalidArgumentError(absl::StrCat(
                    "contrastive loss: labels and distances must have the same shape, got labels ",
                    labels_shape.DebugString(), " and distances ", distances_shape.DebugString())));
    // XLA programs cannot fail at run time, so the margin is checked here when
    // it is a compile-time constant (the usual case: a number in Python, which
    // the Python layer has checked already).
    double margin_value;
    if (ctx->ConstantInputAsFloatScalar(2, &margin_value).ok()) {
      OP_REQUIRES(ctx, IsValidMargin(margin_value),
                  absl::InvalidArgumentError(absl::StrCat(
                      "contrastive loss: margin must be finite and non-negative, got ",
                      margin_value)));
    }
    const xla::PrimitiveType out_type = ctx->input_xla_type(1);
    const xla::PrimitiveType compute =
        (out_type == xla::F16 || out_type == xla::BF16) ? xla::F32 : out_type;
    const xla::XlaOp y = xla::ConvertElementType(ctx->Input(0), compute);
    const xla::XlaOp d = xla::ConvertElementType(ctx->Input(1), compute);
    const xla::XlaOp margin = xla::ConvertElementType(ctx->Input(2), compute);
    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(y, d, margin, &loss, &grad);
    ctx->SetOutput(0, xla::ConvertElementType(loss, out_type));
    ctx->SetOutput(1, xla::ConvertElementType(grad, out_type));
  }
};

REGISTER_XLA_OP(Name(kOpName), ContrastiveLossXlaOp);

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

const bool kLateJitKernelsRegistered = [] {
  std::vector<tensorflow::DataType> labels, distances;
  for (DType t : kAllDTypes) {
    labels.push_back(ToTf(t));
    if (IsDistanceDType(t)) distances.push_back(ToTf(t));
  }
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (!JitKernelsRegistered(backend)) continue;
    tensorflow::kernel_factory::OpKernelRegistrar(
        tensorflow::KernelDefBuilder(kOpName)
            .Device(backend.c_str())
            .TypeConstraint("Tlabels", labels)
            .TypeConstraint("T", distances)
            .Build(),
        "ContrastiveLossXlaOp",
        [](tensorflow::OpKernelConstruction* ctx) -> tensorflow::OpKernel* {
          return new ContrastiveLossXlaOp(ctx);
        });
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
