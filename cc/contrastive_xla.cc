// XLA lowering of the ops: under tf.function(jit_compile=True) and Keras'
// jit_compile (on by default when a GPU is visible) the ops become HLO that
// XLA fuses with their neighbours. The HLO is the formula of contrastive_math.h
// and embedding_math.h itself, evaluated on XlaOps.
#include <vector>

#include "absl/strings/str_cat.h"
#include "contrastive_kernels.h"
#include "contrastive_math.h"
#include "embedding_math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
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
  // These differ from the scalar versions only in the sign of a zero result
  // (abs(-0), sign(-0)) and sign(NaN), which is NaN here: the row's sums are
  // NaN then, and so is its gradient either way.
  static xla::XlaOp abs(const xla::XlaOp& x) { return xla::Abs(x); }
  static xla::XlaOp sign(const xla::XlaOp& x) { return xla::Sign(x); }
  static xla::XlaOp sqrt(const xla::XlaOp& x) { return xla::Sqrt(x); }
};

namespace {

using ::tensorflow::TensorShape;

// The type the formula is evaluated in for a loss of type `type`, as
// ComputeType<T> of the kernels: float32 for the 16-bit types.
xla::PrimitiveType ComputeTypeOf(xla::PrimitiveType type) {
  return (type == xla::F16 || type == xla::BF16) ? xla::F32 : type;
}

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

// Every loss op's labels (input 0) and margin in the compute type. A constant
// margin is checked at compile time. XLA programs cannot raise at run time, so
// a margin known only then (a variable) that is negative or not finite
// becomes NaN: the loss and gradient are NaN, never a silently wrong number.
absl::Status ReadLabelsAndMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 xla::PrimitiveType compute, xla::XlaOp* y,
                                 xla::XlaOp* margin) {
  *margin = ctx->Input(margin_input);
  double margin_value;
  if (ctx->ConstantInputAsFloatScalar(margin_input, &margin_value).ok()) {
    TF_RETURN_IF_ERROR(CheckMargin(margin_value));
  } else {
    const xla::XlaOp valid =
        xla::And(xla::IsFinite(*margin), xla::Ge(*margin, xla::ScalarLike(*margin, 0)));
    *margin = xla::Select(valid, *margin, xla::NanValue(ctx->builder(), xla::F64));
  }
  *margin = xla::ConvertElementType(*margin, compute);
  *y = LabelsToCompute(ctx->Input(0), ctx->input_xla_type(0), compute);
  return absl::OkStatus();
}

// The distance ops' inputs in the compute type: labels, distances, margin.
struct ComputeInputs {
  xla::PrimitiveType out_type;
  xla::PrimitiveType compute;
  xla::XlaOp y, d, margin;
};

absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        ComputeInputs* in) {
  if (ctx->InputShape(0) != ctx->InputShape(1)) {
    return ShapeMismatch("distances", ctx->InputShape(0).DebugString(),
                         ctx->InputShape(1).DebugString());
  }
  in->out_type = ctx->input_xla_type(1);
  in->compute = ComputeTypeOf(in->out_type);
  in->d = xla::ConvertElementType(ctx->Input(1), in->compute);
  return ReadLabelsAndMargin(ctx, margin_input, in->compute, &in->y, &in->margin);
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

// reduction_scale() of contrastive_math.h for n losses with weights w (one per
// loss or a scalar), in float64.
xla::XlaOp ReductionScale(tensorflow::XlaOpKernelContext* ctx, Reduction reduction, xla::XlaOp w,
                          bool scalar_weight, int64_t n, int loss_scale_input) {
  xla::XlaBuilder* builder = ctx->builder();
  // Only kWeightedMean reads the total of per-element weights.
  xla::XlaOp weight_total = xla::ConstantR0<double>(builder, 0.0);
  if (scalar_weight) {
    weight_total = xla::ConvertElementType(w, xla::F64);
  } else if (reduction == Reduction::kWeightedMean) {
    // Every weight added in float64, as the CPU and GPU kernels add them
    // (float32 chunks pay off only where the sum fuses with the loss).
    weight_total = BlockedSum(xla::ConvertElementType(w, xla::F64), n, xla::F64);
  }
  return reduction_scale(reduction, xla::ConstantR0<double>(builder, static_cast<double>(n)),
                         weight_total, ctx->Input(loss_scale_input));
}

// The reduced loss output: total * scale rounded to the compute type first,
// then to the output type, as the kernels store it.
xla::XlaOp ReducedLoss(xla::XlaOp total, xla::XlaOp scale, xla::PrimitiveType compute,
                       xla::PrimitiveType out_type) {
  return xla::ConvertElementType(xla::ConvertElementType(total * scale, compute), out_type);
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
    const TensorShape shape = ctx->InputShape(1);
    const TensorShape weight_shape = ctx->InputShape(2);
    const bool scalar_weight = weight_shape.dims() == 0;
    OP_REQUIRES(ctx, scalar_weight || weight_shape == shape,
                ShapeMismatch("sample_weight", shape.DebugString(), weight_shape.DebugString()));
    const int64_t n = shape.num_elements();
    const xla::XlaOp w = xla::ConvertElementType(ctx->Input(2), in.compute);
    const xla::XlaOp scale = ReductionScale(ctx, reduction_, w, scalar_weight, n, 4);

    xla::XlaOp loss, grad;
    contrastive_loss_and_grad(in.y, in.d, in.margin, similar_label_, &loss, &grad);
    ctx->SetOutput(0, ReducedLoss(BlockedSum(loss * w, n, in.compute), scale, in.compute,
                                  in.out_type));
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

// Embeddings a and b [..., D] as [rows, D] matrices in the compute type: the
// embedding ops' kernels loop over rows, and so does their HLO.
struct EmbeddingRows {
  TensorShape shape;  // [..., D]
  TensorShape row_shape;  // [...]
  int64_t rows, dim;
  xla::PrimitiveType out_type, compute;
  xla::XlaOp a, b;

  // One value per row ([rows]) repeated along the row ([rows, D]).
  xla::XlaOp AlongRows(xla::XlaOp per_row) const {
    return xla::BroadcastInDim(per_row, {rows, dim}, {0});
  }
};

// Reads embeddings a, b from inputs `first` and `first` + 1, whose shapes the
// caller checked to be equal and of rank >= 1.
EmbeddingRows ReadEmbeddingRows(tensorflow::XlaOpKernelContext* ctx, int first) {
  EmbeddingRows e;
  e.shape = ctx->InputShape(first);
  e.row_shape = e.shape;
  e.row_shape.RemoveLastDims(1);
  e.rows = e.row_shape.num_elements();
  e.dim = e.shape.dim_size(e.shape.dims() - 1);
  e.out_type = ctx->input_xla_type(first);
  e.compute = ComputeTypeOf(e.out_type);
  e.a = xla::Reshape(xla::ConvertElementType(ctx->Input(first), e.compute), {e.rows, e.dim});
  e.b = xla::Reshape(xla::ConvertElementType(ctx->Input(first + 1), e.compute), {e.rows, e.dim});
  return e;
}

// The loss-computing embedding ops' inputs, checked as the OpKernels check
// them: labels [...] (as [rows]), embeddings a, b [..., D] and the margin.
struct EmbeddingComputeInputs {
  EmbeddingRows e;
  xla::XlaOp y, margin;
};

absl::Status ReadEmbeddingInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 EmbeddingComputeInputs* in) {
  const TensorShape labels = ctx->InputShape(0);
  const TensorShape a = ctx->InputShape(1);
  const TensorShape b = ctx->InputShape(2);
  TensorShape rows = a;
  if (a != b || a.dims() < 1 || a.dim_size(a.dims() - 1) < 1 ||
      !rows.RemoveLastDimsWithStatus(1).ok() || labels != rows) {
    return EmbeddingShapeMismatch(labels.DebugString(), a.DebugString(), b.DebugString());
  }
  in->e = ReadEmbeddingRows(ctx, 1);
  TF_RETURN_IF_ERROR(ReadLabelsAndMargin(ctx, margin_input, in->e.compute, &in->y, &in->margin));
  in->y = xla::Reshape(in->y, {in->e.rows});
  return absl::OkStatus();
}

// A per-row input in `type`, as [rows] or a scalar.
xla::XlaOp PerRow(tensorflow::XlaOpKernelContext* ctx, int input, const EmbeddingRows& e,
                  xla::PrimitiveType type) {
  const xla::XlaOp x = xla::ConvertElementType(ctx->Input(input), type);
  return ctx->InputShape(input).dims() == 0 ? x : xla::Reshape(x, {e.rows});
}

// Each row's loss and gradient coefficients ([rows] each) for g = d(loss)/d(d):
// the sums of distance_terms<K> along the rows, in the compute type.
template <Distance K>
void RowLossAndCoefficients(const EmbeddingComputeInputs& in, int similar_label,
                            xla::XlaOp* loss, xla::XlaOp* coef) {
  xla::XlaBuilder* builder = in.e.a.builder();
  xla::XlaOp terms[kMaxRowSums], sums[kMaxRowSums];
  distance_terms<K>(in.e.a, in.e.b, terms[0], terms[1], terms[2]);
  for (int j = 0; j < NumRowSums(K); ++j) {
    sums[j] = xla::Reduce(terms[j], xla::Zero(builder, in.e.compute),
                          xla::CreateScalarAddComputation(in.e.compute, builder), {1});
  }
  row_loss_and_coefficients<K>(sums, in.y, in.margin, similar_label, loss, coef);
}

// Sets outputs `first` and `first` + 1 to d(loss)/da and d(loss)/db from the
// rows' coefficients ([rows] each, compute type).
template <Distance K>
void SetEmbeddingGradients(tensorflow::XlaOpKernelContext* ctx, const EmbeddingRows& e,
                           const xla::XlaOp* row_coef, int first) {
  xla::XlaOp coef[kMaxRowSums], grad_a, grad_b;
  for (int j = 0; j < NumRowCoefficients(K); ++j) coef[j] = e.AlongRows(row_coef[j]);
  element_gradient<K>(coef, e.a, e.b, &grad_a, &grad_b);
  for (const xla::XlaOp& grad : {grad_a, grad_b}) {
    ctx->SetOutput(first++, xla::Reshape(xla::ConvertElementType(grad, e.out_type),
                                         e.shape.dim_sizes()));
  }
}

class EmbeddingLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    EmbeddingComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs(ctx, 3, &in));
    const EmbeddingRows& e = in.e;
    xla::XlaOp loss, coef[kMaxRowSums];
    RowLossAndCoefficients<K>(in, similar_label_, &loss, coef);
    ctx->SetOutput(0, xla::Reshape(xla::ConvertElementType(loss, e.out_type),
                                   e.row_shape.dim_sizes()));
    // [rows, K], row-major as the kernels write it.
    std::vector<xla::XlaOp> columns;
    for (int j = 0; j < NumRowCoefficients(K); ++j) {
      columns.push_back(xla::Reshape(xla::ConvertElementType(coef[j], xla::F64), {e.rows, 1}));
    }
    TensorShape coefficient_shape = e.row_shape;
    coefficient_shape.AddDim(NumRowCoefficients(K));
    ctx->SetOutput(1, xla::Reshape(xla::ConcatInDim(ctx->builder(), columns, 1),
                                   coefficient_shape.dim_sizes()));
  }

  int similar_label_;
  Distance distance_;
};

class EmbeddingGradXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingGradXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    const TensorShape a = ctx->InputShape(0);
    const TensorShape b = ctx->InputShape(1);
    OP_REQUIRES(ctx, a == b && a.dims() >= 1,
                EmbeddingShapeMismatch("(none)", a.DebugString(), b.DebugString()));
    const EmbeddingRows e = ReadEmbeddingRows(ctx, 0);
    constexpr int kCoefficients = NumRowCoefficients(K);
    OP_REQUIRES_OK(ctx, CheckRowCoefficients(ctx->InputShape(2), e.row_shape, K));
    OP_REQUIRES_OK(ctx, CheckPerRow("upstream", ctx->InputShape(3), e.row_shape));
    // coefficient * upstream in float64, then the compute type, as the kernels.
    const xla::XlaOp upstream = PerRow(ctx, 3, e, xla::F64);
    const xla::XlaOp all = xla::Reshape(ctx->Input(2), {e.rows, int64_t{kCoefficients}});
    xla::XlaOp coef[kMaxRowSums];
    for (int j = 0; j < kCoefficients; ++j) {
      const xla::XlaOp column = xla::Reshape(xla::SliceInDim(all, j, j + 1, 1, 1), {e.rows});
      coef[j] = xla::ConvertElementType(column * upstream, e.compute);
    }
    SetEmbeddingGradients<K>(ctx, e, coef, 0);
  }

  Distance distance_;
};

// The reduced embedding op: sums as ContrastiveLossReducedXlaOp, over rows.
class EmbeddingLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx)
      : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    EmbeddingComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs(ctx, 4, &in));
    const EmbeddingRows& e = in.e;
    const TensorShape weight_shape = ctx->InputShape(3);
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weight_shape, e.row_shape));
    const xla::XlaOp w = PerRow(ctx, 3, e, e.compute);
    const bool scalar_weight = weight_shape.dims() == 0;
    const xla::XlaOp scale = ReductionScale(ctx, reduction_, w, scalar_weight, e.rows, 5);
    xla::XlaOp loss, coef[kMaxRowSums];
    RowLossAndCoefficients<K>(in, similar_label_, &loss, coef);
    ctx->SetOutput(0, ReducedLoss(BlockedSum(loss * w, e.rows, e.compute), scale, e.compute,
                                  e.out_type));
    const xla::XlaOp factor = w * xla::ConvertElementType(scale, e.compute);
    for (int j = 0; j < NumRowCoefficients(K); ++j) coef[j] = coef[j] * factor;
    SetEmbeddingGradients<K>(ctx, e, coef, 1);
    ctx->SetOutput(3, scale);
  }

  Reduction reduction_;
  int similar_label_;
  Distance distance_;
};

REGISTER_XLA_OP(Name(kOpName), ContrastiveLossXlaOp);
REGISTER_XLA_OP(Name(kReducedOpName), ContrastiveLossReducedXlaOp);
REGISTER_XLA_OP(Name(kScaleOpName), ScaleGradientXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingOpName), EmbeddingLossXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingGradOpName), EmbeddingGradXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingReducedOpName), EmbeddingLossReducedXlaOp);

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
    RegisterKernels<EmbeddingLossXlaOp>(kEmbeddingOpName, device, "EmbeddingLossXlaOp", true,
                                        {});
    RegisterKernels<EmbeddingGradXlaOp>(kEmbeddingGradOpName, device, "EmbeddingGradXlaOp",
                                        false, {});
    RegisterKernels<EmbeddingLossReducedXlaOp>(kEmbeddingReducedOpName, device,
                                               "EmbeddingLossReducedXlaOp", true, {});
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
