// XLA lowering of the ops: under tf.function(jit_compile=True) and Keras'
// jit_compile (on by default when a GPU is visible) the ops become HLO that
// XLA fuses with their neighbours. The HLO is the formula of contrastive_math.h,
// embedding_math.h and in_batch_math.h itself, evaluated on XlaOps. On XLA's
// CPU backend the embedding and in-batch ops are custom calls of the fused CPU
// kernels instead (see below).

// Eigen's ThreadPoolDevice is only declared with this (its cost model shards
// the host custom call's work).
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <condition_variable>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/distances/kernels.h"
#include "core/common/formula.h"
#include "core/pairs/kernels.h"
#include "core/pairs/math.h"
#include "tensorflow/compiler/tf2xla/type_util.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/lib/loops.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf_shared.h"
#include "unsupported/Eigen/CXX11/Tensor"
#include "xla/ffi/api/ffi.h"
#include "xla/hlo/builder/xla_builder.h"

namespace fused_contrastive {

template <>
struct ElementOps<xla::XlaOp> {
  static xla::XlaOp constant(const xla::XlaOp& like, int value) {
    return xla::ScalarLike(like, value);
  }
  // XLA's max propagates NaN, as the scalar version does.
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
  static xla::XlaOp weighted(const xla::XlaOp& w, const xla::XlaOp& x) {
    const xla::XlaOp zero = constant(w, 0);
    return xla::Select(xla::And(xla::Eq(w, zero), xla::Eq(x, x)), zero, w * x);
  }
  static xla::XlaOp masked(const xla::XlaOp& mask, const xla::XlaOp& x) {
    return xla::Select(xla::Ne(mask, constant(mask, 0)), x, xla::ZerosLike(x));
  }
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

// A constant margin is checked at compile time; *constant says whether it was
// one. XLA programs cannot raise at run time, so a margin known only then (a
// variable) that is negative or not finite makes the loss and gradient NaN,
// never a silently wrong number.
absl::Status CheckConstantMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 bool* constant, const char* what = "margin") {
  double margin_value;
  *constant = ctx->ConstantInputAsFloatScalar(margin_input, &margin_value).ok();
  return *constant ? CheckMargin(margin_value, what) : absl::OkStatus();
}

// A margin input in the compute type, an invalid run-time one as NaN
// (CheckConstantMargin).
absl::Status ReadMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        xla::PrimitiveType compute, xla::XlaOp* margin,
                        const char* what = "margin") {
  *margin = ctx->Input(margin_input);
  bool constant;
  TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, margin_input, &constant, what));
  if (!constant) {
    const xla::XlaOp valid =
        xla::And(xla::IsFinite(*margin), xla::Ge(*margin, xla::ScalarLike(*margin, 0)));
    *margin = xla::Select(valid, *margin, xla::NanValue(ctx->builder(), xla::F64));
  }
  *margin = xla::ConvertElementType(*margin, compute);
  return absl::OkStatus();
}

// Every loss op's labels (input 0) and margin in the compute type.
absl::Status ReadLabelsAndMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 xla::PrimitiveType compute, xla::XlaOp* y,
                                 xla::XlaOp* margin) {
  TF_RETURN_IF_ERROR(ReadMargin(ctx, margin_input, compute, margin));
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
  TensorShape shape;  // [..., D], or the stacked pair's [..., 2, D]
  TensorShape row_shape;  // [...]
  bool stacked;  // a and b are the halves of one stacked pair input
  int64_t rows, dim;
  xla::PrimitiveType out_type, compute;
  xla::XlaOp a, b;

  // One value per row ([rows]) repeated along the row ([rows, D]).
  xla::XlaOp AlongRows(xla::XlaOp per_row) const {
    return xla::BroadcastInDim(per_row, {rows, dim}, {0});
  }
};

// The shapes and types of embeddings a, b at inputs `first` and `first` + 1,
// whose shapes the caller checked to be equal and of rank >= 1; a and b unset.
// With `stacked`, input `first` is the stacked pair [..., 2, D], whose shape
// the caller checked (CheckPairShapes).
EmbeddingRows EmbeddingRowShapes(tensorflow::XlaOpKernelContext* ctx, int first,
                                 bool stacked = false) {
  EmbeddingRows e;
  e.shape = ctx->InputShape(first);
  e.row_shape = e.shape;
  e.row_shape.RemoveLastDims(stacked ? 2 : 1);
  e.stacked = stacked;
  e.rows = e.row_shape.num_elements();
  e.dim = e.shape.dim_size(e.shape.dims() - 1);
  e.out_type = ctx->input_xla_type(first);
  e.compute = ComputeTypeOf(e.out_type);
  return e;
}

// EmbeddingRowShapes, with a and b read.
EmbeddingRows ReadEmbeddingRows(tensorflow::XlaOpKernelContext* ctx, int first,
                                bool stacked = false) {
  EmbeddingRows e = EmbeddingRowShapes(ctx, first, stacked);
  if (stacked) {
    const xla::XlaOp pairs =
        xla::Reshape(xla::ConvertElementType(ctx->Input(first), e.compute), {e.rows, 2, e.dim});
    e.a = xla::Reshape(xla::SliceInDim(pairs, 0, 1, 1, 1), {e.rows, e.dim});
    e.b = xla::Reshape(xla::SliceInDim(pairs, 1, 2, 1, 1), {e.rows, e.dim});
    return e;
  }
  e.a = xla::Reshape(xla::ConvertElementType(ctx->Input(first), e.compute), {e.rows, e.dim});
  e.b = xla::Reshape(xla::ConvertElementType(ctx->Input(first + 1), e.compute), {e.rows, e.dim});
  return e;
}

// A Conditional's branch: f of its operands (a tuple of those of
// `operands`' shapes), each converted to `compute`, its result to `type`.
template <typename F>
absl::StatusOr<xla::XlaComputation> Branch(xla::XlaBuilder* parent, const char* name,
                                           const std::vector<xla::XlaOp>& operands,
                                           xla::PrimitiveType compute, xla::PrimitiveType type,
                                           const F& f) {
  const std::unique_ptr<xla::XlaBuilder> builder = parent->CreateSubBuilder(name);
  std::vector<xla::Shape> shapes;
  for (const xla::XlaOp& operand : operands) {
    TF_ASSIGN_OR_RETURN(xla::Shape shape, parent->GetShape(operand));
    shapes.push_back(shape);
  }
  const xla::XlaOp tuple =
      xla::Parameter(builder.get(), 0, xla::ShapeUtil::MakeTupleShape(shapes), "operands");
  std::vector<xla::XlaOp> args;
  for (int64_t i = 0; i < static_cast<int64_t>(operands.size()); ++i) {
    args.push_back(xla::ConvertElementType(xla::GetTupleElement(tuple, i), compute));
  }
  xla::ConvertElementType(f(args), type);
  return builder->Build();
}

// The branches of a Conditional: f of its operands, evaluated in `compute`.
template <typename F>
struct BranchOf {
  const char* name;
  std::vector<xla::XlaOp> operands;
  xla::PrimitiveType compute;
  F f;
};
template <typename F>
BranchOf(const char*, std::vector<xla::XlaOp>, xla::PrimitiveType, F) -> BranchOf<F>;

// Only one of the branches runs: when the scalar PRED `pred` holds, `when`,
// else `otherwise`; the result in `type`.
template <typename When, typename Otherwise>
absl::StatusOr<xla::XlaOp> Choose(xla::XlaOp pred, const BranchOf<When>& when,
                                  const BranchOf<Otherwise>& otherwise,
                                  xla::PrimitiveType type) {
  xla::XlaBuilder* builder = pred.builder();
  TF_ASSIGN_OR_RETURN(const xla::XlaComputation when_branch,
                      Branch(builder, when.name, when.operands, when.compute, type, when.f));
  TF_ASSIGN_OR_RETURN(
      const xla::XlaComputation otherwise_branch,
      Branch(builder, otherwise.name, otherwise.operands, otherwise.compute, type, otherwise.f));
  return xla::Conditional(pred, xla::Tuple(builder, when.operands), when_branch,
                          xla::Tuple(builder, otherwise.operands), otherwise_branch);
}

// --- Cosine's row scaling in HLO (CosineScaling, cosine_row_exponent) ---------------------
// XLA has no frexp or ldexp; for F32 and F64 rows they are read from and
// written into the floats' bits.

struct FloatBits {
  xla::PrimitiveType integer;
  int mantissa_bits, bias;
  double min_normal;
};

FloatBits BitsOf(xla::PrimitiveType type) {
  return type == xla::F64 ? FloatBits{xla::S64, 52, 1023, std::numeric_limits<double>::min()}
                          : FloatBits{xla::S32, 23, 127, std::numeric_limits<float>::min()};
}

// The largest |element| of each row of x [rows, D]: [rows] (NaN rows NaN).
xla::XlaOp RowMaxAbs(xla::XlaOp x, xla::PrimitiveType type) {
  xla::XlaBuilder* builder = x.builder();
  return xla::Reduce(xla::Abs(x), xla::Zero(builder, type),
                     xla::CreateScalarMaxComputation(type, builder), {1});
}

// frexp's exponent (S32) of positive finite x, normal or subnormal: x = m·2^e,
// m in [0.5, 1). Other x give an unspecified value, for the caller to select
// away.
xla::XlaOp BinaryExponent(xla::XlaOp x, xla::PrimitiveType type) {
  const FloatBits f = BitsOf(type);
  const xla::XlaOp subnormal = xla::Lt(x, xla::ScalarLike(x, f.min_normal));
  const xla::XlaOp normal = xla::Select(subnormal, x * xla::ScalarLike(x, 0x1p64), x);
  const xla::XlaOp bits = xla::BitcastConvertType(normal, f.integer);
  const xla::XlaOp biased = xla::ConvertElementType(
      xla::And(xla::ShiftRightLogical(bits, xla::ScalarLike(bits, f.mantissa_bits)),
               xla::ScalarLike(bits, 2 * f.bias + 1)),
      xla::S32);
  return biased - xla::ScalarLike(biased, f.bias - 1) -
         xla::Select(subnormal, xla::ScalarLike(biased, 64), xla::ScalarLike(biased, 0));
}

// 2^e for S32 exponents e of normal numbers of `type`.
xla::XlaOp PowerOfTwo(xla::XlaOp e, xla::PrimitiveType type) {
  const FloatBits f = BitsOf(type);
  const xla::XlaOp biased = xla::ConvertElementType(e + xla::ScalarLike(e, f.bias), f.integer);
  return xla::BitcastConvertType(xla::ShiftLeft(biased, xla::ScalarLike(biased, f.mantissa_bits)),
                                 type);
}

// Where the positive, finite max_abs holds (the others: zero, inf and NaN
// rows, which scaling cannot help; the rules leave them alone).
xla::XlaOp PositiveFinite(xla::XlaOp max_abs) {
  return xla::And(xla::Gt(max_abs, xla::ZerosLike(max_abs)), xla::IsFinite(max_abs));
}

// cosine_scale of each row's max_abs [rows] (the embedding kernels' s_a, s_b).
xla::XlaOp CosineScales(xla::XlaOp max_abs, xla::PrimitiveType type) {
  const int limit =
      type == xla::F64 ? CosineScaling<double>::kMaxShift : CosineScaling<float>::kMaxShift;
  const xla::XlaOp shift = xla::Clamp(xla::ConstantR0<int32_t>(max_abs.builder(), -limit),
                                      -BinaryExponent(max_abs, type),
                                      xla::ConstantR0<int32_t>(max_abs.builder(), limit));
  return xla::Select(PositiveFinite(max_abs), PowerOfTwo(shift, type), xla::FullLike(max_abs, 1));
}

// cosine_row_exponent of each row's max_abs [rows]: S32, 0 for rows used as
// they are.
xla::XlaOp CosineRowExponents(xla::XlaOp max_abs, xla::PrimitiveType type) {
  const xla::XlaOp k = BinaryExponent(max_abs, type);
  const xla::XlaOp limit = xla::ScalarLike(k, kCosineRowExponentLimit);
  const xla::XlaOp extreme = xla::And(PositiveFinite(max_abs), xla::Gt(xla::Abs(k), limit));
  return xla::Select(extreme, k, xla::ZerosLike(k));
}

// x [rows, D] with row i multiplied by 2^e_i (e [rows], S32), exactly (as
// ldexp) for |e_i| up to twice the exponent range: in two steps of half of
// e_i each, so that each factor is a normal number.
xla::XlaOp ScaleRowsByPowerOfTwo(xla::XlaOp x, xla::XlaOp e, xla::PrimitiveType type,
                                 int64_t rows, int64_t dim) {
  const xla::XlaOp half = xla::Div(e, xla::ScalarLike(e, 2));
  for (const xla::XlaOp& step : {half, e - half}) {
    x = x * xla::BroadcastInDim(PowerOfTwo(step, type), {rows, dim}, {0});
  }
  return x;
}

// The loss-computing embedding ops' inputs, checked as the OpKernels check
// them: labels [...] (as [rows]), embeddings a, b [..., D] and the margin.
struct EmbeddingComputeInputs {
  EmbeddingRows e;
  xla::XlaOp y, margin;
};

// Labels [...] and embeddings a, b [..., D] (inputs 0-2).
absl::Status CheckEmbeddingShapes(tensorflow::XlaOpKernelContext* ctx) {
  const TensorShape labels = ctx->InputShape(0);
  const TensorShape a = ctx->InputShape(1);
  const TensorShape b = ctx->InputShape(2);
  TensorShape rows = a;
  if (a != b || a.dims() < 1 || a.dim_size(a.dims() - 1) < 1 ||
      !rows.RemoveLastDimsWithStatus(1).ok() || labels != rows) {
    return EmbeddingShapeMismatch(labels.DebugString(), a.DebugString(), b.DebugString());
  }
  return absl::OkStatus();
}

// Embeddings a, b (inputs 1, 2), or with `stacked` the stacked pair (input
// 1), checked as the OpKernels check them.
absl::Status CheckEmbeddingOrPairShapes(tensorflow::XlaOpKernelContext* ctx, bool stacked) {
  return stacked ? CheckPairShapes(ctx->InputShape(0), ctx->InputShape(1))
                 : CheckEmbeddingShapes(ctx);
}

absl::Status ReadEmbeddingInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 EmbeddingComputeInputs* in, bool stacked = false) {
  TF_RETURN_IF_ERROR(CheckEmbeddingOrPairShapes(ctx, stacked));
  in->e = ReadEmbeddingRows(ctx, 1, stacked);
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

// The row sums of a and b ([rows, D] each, in `type`): sums[j] for j below
// NumRowSums(K), [rows] each.
template <Distance K>
void RowSumsOf(xla::XlaOp a, xla::XlaOp b, xla::PrimitiveType type, xla::XlaOp* sums) {
  xla::XlaBuilder* builder = a.builder();
  xla::XlaOp terms[kMaxRowSums];
  distance_terms<K>(a, b, terms[0], terms[1], terms[2]);
  for (int j = 0; j < NumRowSums(K); ++j) {
    sums[j] = xla::Reduce(terms[j], xla::Zero(builder, type),
                          xla::CreateScalarAddComputation(type, builder), {1});
  }
}

// Cosine's row values sums[0..5) from its sums sums[0..3) as the kernels take
// them (CosineScaling): the sums as they are and scales 1, except in rows
// whose Σa² or Σb² leaves [kLow, kHigh], summed again at the scales s_a, s_b.
// That second read of the rows runs only when some row needs it.
absl::Status ScaleCosineRows(const EmbeddingRows& e, xla::XlaOp* sums) {
  const xla::PrimitiveType type = e.compute;
  const bool f64 = type == xla::F64;
  const double low = f64 ? CosineScaling<double>::kLow : CosineScaling<float>::kLow;
  const double high = f64 ? CosineScaling<double>::kHigh : CosineScaling<float>::kHigh;
  const auto out_of_range = [&](xla::XlaOp norm2_a, xla::XlaOp norm2_b) {
    const auto outside = [&](xla::XlaOp x) {
      return xla::Or(xla::Lt(x, xla::ScalarLike(x, low)), xla::Gt(x, xla::ScalarLike(x, high)));
    };
    return xla::Or(outside(norm2_a), outside(norm2_b));
  };
  // The five row values as one [5, rows] result.
  const auto values = [&](std::initializer_list<xla::XlaOp> rows) {
    std::vector<xla::XlaOp> parts;
    for (const xla::XlaOp& row : rows) parts.push_back(xla::Reshape(row, {1, e.rows}));
    return xla::ConcatInDim(parts.front().builder(), parts, 0);
  };
  // x: a, b, then the three sums.
  const auto rescaled = [&](const std::vector<xla::XlaOp>& x) {
    const xla::XlaOp s_a = CosineScales(RowMaxAbs(x[0], type), type);
    const xla::XlaOp s_b = CosineScales(RowMaxAbs(x[1], type), type);
    xla::XlaOp scaled[kMaxRowSums];
    RowSumsOf<Distance::kCosine>(x[0] * e.AlongRows(s_a), x[1] * e.AlongRows(s_b), type, scaled);
    const xla::XlaOp redo = out_of_range(x[3], x[4]);
    const xla::XlaOp one = xla::FullLike(s_a, 1);
    return values({xla::Select(redo, scaled[0], x[2]), xla::Select(redo, scaled[1], x[3]),
                   xla::Select(redo, scaled[2], x[4]), xla::Select(redo, s_a, one),
                   xla::Select(redo, s_b, one)});
  };
  const auto as_is = [&](const std::vector<xla::XlaOp>& x) {
    const xla::XlaOp one = xla::FullLike(x[0], 1);
    return values({x[0], x[1], x[2], one, one});
  };
  TF_ASSIGN_OR_RETURN(
      const xla::XlaOp all,
      Choose(xla::Any(out_of_range(sums[1], sums[2])),
             BranchOf{"cosine_rescaled", {e.a, e.b, sums[0], sums[1], sums[2]}, type, rescaled},
             BranchOf{"cosine_as_is", {sums[0], sums[1], sums[2]}, type, as_is}, type));
  for (int j = 0; j < kMaxRowValues; ++j) {
    sums[j] = xla::Reshape(xla::SliceInDim(all, j, j + 1, 1, 0), {e.rows});
  }
  return absl::OkStatus();
}

// Each row's loss and gradient coefficients ([rows] each) for g = d(loss)/d(d):
// the sums of distance_terms<K> along the rows, in the compute type.
template <Distance K>
absl::Status RowLossAndCoefficients(const EmbeddingComputeInputs& in, int similar_label,
                                    xla::XlaOp* loss, xla::XlaOp* coef) {
  xla::XlaOp sums[kMaxRowValues];
  RowSumsOf<K>(in.e.a, in.e.b, in.e.compute, sums);
  if constexpr (K == Distance::kCosine) TF_RETURN_IF_ERROR(ScaleCosineRows(in.e, sums));
  row_loss_and_coefficients<K>(sums, in.y, in.margin, similar_label, loss, coef);
  return absl::OkStatus();
}

// Sets outputs `first` and `first` + 1 to the gradients `grads` of a and b
// ([rows, D] each, out type), or for a stacked pair output `first` to both
// stacked again as [..., 2, D].
void SetGradientOutputs(tensorflow::XlaOpKernelContext* ctx, const EmbeddingRows& e,
                        const xla::XlaOp* grads, int first) {
  if (e.stacked) {
    const xla::XlaOp both = xla::ConcatInDim(
        ctx->builder(),
        {xla::Reshape(grads[0], {e.rows, 1, e.dim}), xla::Reshape(grads[1], {e.rows, 1, e.dim})},
        1);
    ctx->SetOutput(first, xla::Reshape(both, e.shape.dim_sizes()));
    return;
  }
  for (int i = 0; i < 2; ++i) {
    ctx->SetOutput(first + i, xla::Reshape(grads[i], e.shape.dim_sizes()));
  }
}

// Sets the gradient outputs from `first` on (SetGradientOutputs) from the
// rows' coefficients ([rows] each, compute type).
template <Distance K>
void SetEmbeddingGradients(tensorflow::XlaOpKernelContext* ctx, const EmbeddingRows& e,
                           const xla::XlaOp* row_coef, int first) {
  xla::XlaOp coef[kMaxRowValues], grads[2];
  for (int j = 0; j < NumRowCoefficients(K); ++j) coef[j] = e.AlongRows(row_coef[j]);
  element_gradient<K>(coef, e.a, e.b, &grads[0], &grads[1]);
  for (xla::XlaOp& grad : grads) grad = xla::ConvertElementType(grad, e.out_type);
  SetGradientOutputs(ctx, e, grads, first);
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
    xla::XlaOp loss, coef[kMaxRowValues];
    OP_REQUIRES_OK(ctx, RowLossAndCoefficients<K>(in, similar_label_, &loss, coef));
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

 protected:
  // The host lowerings below read them too.
  int similar_label_;
  Distance distance_;
};

// The grad op's a, b [..., D], row_coefficients and upstream (inputs 0-3).
absl::Status CheckGradShapes(tensorflow::XlaOpKernelContext* ctx, Distance distance) {
  const TensorShape a = ctx->InputShape(0);
  const TensorShape b = ctx->InputShape(1);
  if (a != b || a.dims() < 1) {
    return EmbeddingShapeMismatch("(none)", a.DebugString(), b.DebugString());
  }
  TensorShape rows = a;
  rows.RemoveLastDims(1);
  TF_RETURN_IF_ERROR(CheckRowCoefficients(ctx->InputShape(2), rows, distance));
  return CheckPerRow("upstream", ctx->InputShape(3), rows);
}

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
    OP_REQUIRES_OK(ctx, CheckGradShapes(ctx, K));
    const EmbeddingRows e = ReadEmbeddingRows(ctx, 0);
    constexpr int kCoefficients = NumRowCoefficients(K);
    // coefficient * upstream in float64, then the compute type, as the kernels.
    const xla::XlaOp upstream = PerRow(ctx, 3, e, xla::F64);
    const xla::XlaOp all = xla::Reshape(ctx->Input(2), {e.rows, int64_t{kCoefficients}});
    xla::XlaOp coef[kMaxRowValues];
    for (int j = 0; j < kCoefficients; ++j) {
      const xla::XlaOp column = xla::Reshape(xla::SliceInDim(all, j, j + 1, 1, 1), {e.rows});
      // Only the coefficients scale with the upstream gradient, not cosine's scales.
      coef[j] = xla::ConvertElementType(j < NumRowSums(K) ? column * upstream : column,
                                        e.compute);
    }
    SetEmbeddingGradients<K>(ctx, e, coef, 0);
  }

 protected:
  // The host lowerings below read them too.
  Distance distance_;
};

// The reduced embedding op: sums as ContrastiveLossReducedXlaOp, over rows.
// The same class lowers the stacked-pair op, whose pair is input 1 and whose
// gradient is output 1 (inputs and outputs after them shift by one).
class EmbeddingLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx)
      : XlaOpKernel(ctx), stacked_(ctx->def().op() == kEmbeddingPairReducedOpName) {
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
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs(ctx, weights_input() + 1, &in, stacked_));
    const EmbeddingRows& e = in.e;
    const TensorShape weight_shape = ctx->InputShape(weights_input());
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weight_shape, e.row_shape));
    const xla::XlaOp w = PerRow(ctx, weights_input(), e, e.compute);
    const bool scalar_weight = weight_shape.dims() == 0;
    const xla::XlaOp scale =
        ReductionScale(ctx, reduction_, w, scalar_weight, e.rows, weights_input() + 2);
    xla::XlaOp loss, coef[kMaxRowValues];
    OP_REQUIRES_OK(ctx, RowLossAndCoefficients<K>(in, similar_label_, &loss, coef));
    ctx->SetOutput(0, ReducedLoss(BlockedSum(loss * w, e.rows, e.compute), scale, e.compute,
                                  e.out_type));
    const xla::XlaOp factor = w * xla::ConvertElementType(scale, e.compute);
    for (int j = 0; j < NumRowSums(K); ++j) coef[j] = coef[j] * factor;
    SetEmbeddingGradients<K>(ctx, e, coef, 1);
    ctx->SetOutput(scale_output(), scale);
  }

 protected:
  // Inputs: labels, a, b (or the pair), sample_weight, margin, loss_scale.
  int weights_input() const { return stacked_ ? 2 : 3; }
  // Outputs: loss, grad_a, grad_b (or the pair's gradient), reduction_scale.
  int scale_output() const { return stacked_ ? 2 : 3; }

  // The host lowerings below read them too.
  bool stacked_;
  Reduction reduction_;
  int similar_label_;
  Distance distance_;
};

// --- The in-batch ops (in_batch_math.h) ---------------------------------------------------
// Their HLO lowering (the backends other than CPU) runs the kernels' sweep as
// a While loop over blocks of R anchor rows, each against all B rows:
// S = E_blk·Eᵀ [R, B], the pair terms of in_batch_math.h evaluated on S, and
// for the gradient M [R, B] and M·E. No value has more than R·B elements, so
// memory grows linearly in B.
//
// The Euclidean Gram formula's d² carries a few ulp of ‖e_i‖² + ‖e_j‖², which
// swamps d² when rows sit far from the origin (float32 losses 1e-2 to 2e-2
// off for rows of spread 1 about a point at norm 560). The distance and its gradient
// Σ_j M_ij·(e_i − e_j) are translation-invariant, so the sweep runs on the
// rows less the batch's mean row, whose rounding is of the rows' spread, not
// of their offset. Where close rows sit far from the mean even so (clusters
// far apart), a float32 block with a pair that cancels takes its distances
// and gradient from float64 products (the kernels instead recompute such
// pairs from e_i − e_j, which a [R, B] tile cannot hold); float64 rows keep
// the Gram formula's rounding, a few float64 ulp of ‖e_i‖² + ‖e_j‖² about the
// mean. Cosine is not translation-invariant; it is computed as the kernels
// compute it, with their accuracy.

// Elements of an [R, B] block: a few of them live per iteration (S, M, the
// terms), tens of MiB in float32, while the products E_blk·Eᵀ and M·E stay
// large enough to run near the GEMMs' peak.
constexpr int64_t kInBatchBlockElements = int64_t{1} << 22;

int64_t InBatchBlockRows(int64_t rows, int64_t max_block_rows) {
  int64_t block = std::min(rows, kInBatchBlockElements / std::max<int64_t>(rows, 1));
  if (max_block_rows > 0) block = std::min(block, max_block_rows);
  return std::max<int64_t>(block, 1);
}

// The in-batch ops' labels [B] (int64), embeddings [B, D] (their dtype,
// float32 or float64, is the compute type) and margins.
struct InBatchInputs {
  int64_t rows, dim, block;
  xla::PrimitiveType type;
  xla::XlaOp labels, e, margin, positive_margin;
};

// The shapes checked as the OpKernels check them, and the type; the ops unset.
absl::Status InBatchShapes(tensorflow::XlaOpKernelContext* ctx, int64_t max_block_rows,
                           InBatchInputs* in) {
  const TensorShape labels = ctx->InputShape(0);
  const TensorShape e = ctx->InputShape(1);
  TF_RETURN_IF_ERROR(CheckInBatchShapes(labels, e));
  in->rows = e.dim_size(0);
  in->dim = e.dim_size(1);
  in->block = InBatchBlockRows(in->rows, max_block_rows);
  in->type = ctx->input_xla_type(1);
  return absl::OkStatus();
}

// With the margins at `margin_input` and the one after.
absl::Status ReadInBatchInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                               int64_t max_block_rows, InBatchInputs* in) {
  TF_RETURN_IF_ERROR(InBatchShapes(ctx, max_block_rows, in));
  in->labels = ctx->Input(0);
  in->e = ctx->Input(1);
  TF_RETURN_IF_ERROR(ReadMargin(ctx, margin_input, in->type, &in->margin));
  return ReadMargin(ctx, margin_input + 1, in->type, &in->positive_margin, "positive_margin");
}

// The in-batch grad op's upstream (input 2): of the labels' shape.
absl::Status CheckInBatchUpstream(tensorflow::XlaOpKernelContext* ctx) {
  if (ctx->InputShape(2) == ctx->InputShape(0)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("in-batch contrastive loss: upstream must have the labels' shape ",
                   ctx->InputShape(0).DebugString(), ", got ", ctx->InputShape(2).DebugString()));
}

// Runs body(start, values, builder) once per block of `block` rows of `rows`
// (rows >= block >= 1) on the loop-carried `values`, start being the block's
// first row (S64). The last block starts at rows − block, overlapping the
// one before instead of reaching past the last row: what the body computes
// for a row depends on that row alone, so the rows computed twice are
// written twice by the same formula, and no padded copies of the inputs
// are needed.
template <typename Body>
absl::StatusOr<std::vector<xla::XlaOp>> ForEachRowBlock(int64_t rows, int64_t block,
                                                        const std::vector<xla::XlaOp>& values,
                                                        const char* name, const Body& body) {
  return xla::ForEachIndex(
      (rows + block - 1) / block, xla::S64,
      [&](xla::XlaOp index, absl::Span<const xla::XlaOp> v,
          xla::XlaBuilder* builder) -> absl::StatusOr<std::vector<xla::XlaOp>> {
        const xla::XlaOp start = xla::Min(index * xla::ConstantR0<int64_t>(builder, block),
                                          xla::ConstantR0<int64_t>(builder, rows - block));
        return body(start, std::vector<xla::XlaOp>(v.begin(), v.end()), builder);
      },
      values, name, values.front().builder());
}

// Rows [start, start + block) of x ([rows] or [rows, D]).
xla::XlaOp RowBlock(xla::XlaOp x, xla::XlaOp start, int64_t block) {
  const xla::Shape shape = x.builder()->GetShape(x).value();
  std::vector<xla::XlaOp> starts = {start};
  std::vector<int64_t> sizes = {block};
  for (size_t d = 1; d < shape.dimensions().size(); ++d) {
    starts.push_back(xla::ScalarLike(start, 0));
    sizes.push_back(shape.dimensions(d));
  }
  return xla::DynamicSlice(x, starts, sizes);
}

xla::XlaOp SetRowBlock(xla::XlaOp x, xla::XlaOp block_values, xla::XlaOp start) {
  std::vector<xla::XlaOp> starts = {start};
  if (x.builder()->GetShape(x).value().dimensions().size() == 2) {
    starts.push_back(xla::ScalarLike(start, 0));
  }
  return xla::DynamicUpdateSlice(x, block_values, starts);
}

// Sum along the last axis of an [R, B] block.
xla::XlaOp RowSums(xla::XlaOp x) {
  xla::XlaBuilder* builder = x.builder();
  const xla::PrimitiveType type = builder->GetShape(x).value().element_type();
  return xla::Reduce(x, xla::Zero(builder, type),
                     xla::CreateScalarAddComputation(type, builder), {1});
}

// The mean row [D] of x [B, D] (B > 0).
xla::XlaOp MeanRow(xla::XlaOp x, int64_t rows) {
  xla::XlaBuilder* builder = x.builder();
  const xla::PrimitiveType type = builder->GetShape(x).value().element_type();
  const xla::XlaOp sums =
      xla::Reduce(x, xla::Zero(builder, type), xla::CreateScalarAddComputation(type, builder), {0});
  return sums / xla::ScalarLike(sums, static_cast<double>(rows));
}

// x [R, D] less the row `centre` [D].
xla::XlaOp LessRow(xla::XlaOp x, xla::XlaOp centre) {
  return x - xla::BroadcastInDim(centre, x.builder()->GetShape(x).value().dimensions(), {1});
}

// Products at full precision: XLA's GPU backend may otherwise take float32
// dots in TF32, whose rounding the Euclidean Gram formula would magnify.
xla::XlaOp PreciseDot(xla::XlaOp a, xla::XlaOp b, int64_t a_contract, int64_t b_contract) {
  xla::DotDimensionNumbers dims;
  dims.add_lhs_contracting_dimensions(a_contract);
  dims.add_rhs_contracting_dimensions(b_contract);
  xla::PrecisionConfig precision;
  precision.add_operand_precision(xla::PrecisionConfig::HIGHEST);
  precision.add_operand_precision(xla::PrecisionConfig::HIGHEST);
  return xla::DotGeneral(a, b, dims, &precision);
}

// [R] values along the rows ([R, B]) and [B] values along the columns.
struct PairBlock {
  int64_t block, rows;
  xla::XlaOp AlongRows(xla::XlaOp per_anchor) const {
    return xla::BroadcastInDim(per_anchor, {block, rows}, {0});
  }
  xla::XlaOp AlongColumns(xla::XlaOp per_row) const {
    return xla::BroadcastInDim(per_row, {block, rows}, {1});
  }
  // Which pairs (i, j) of anchors i (labels y_block, rows from start) and rows
  // j have equal labels, and which have j ≠ i.
  void Masks(xla::XlaOp y_block, xla::XlaOp y, xla::XlaOp start, xla::XlaOp* same,
             xla::XlaOp* other) const {
    xla::XlaBuilder* builder = y.builder();
    *same = xla::Eq(AlongRows(y_block), AlongColumns(y));
    const xla::Shape index = xla::ShapeUtil::MakeShape(xla::S64, {block, rows});
    *other = xla::Ne(xla::Iota(builder, index, 0) + start, xla::Iota(builder, index, 1));
  }
};

// pair_weights() of every row, in float64 ([B] each): constants for
// "uniform"; for "balanced" from each row's count of other rows with its
// label, counted in a first loop over row blocks.
absl::Status InBatchPairWeights(const InBatchInputs& in, PairWeighting weighting,
                                xla::XlaOp* positive_weight, xla::XlaOp* negative_weight) {
  xla::XlaBuilder* builder = in.labels.builder();
  if (weighting == PairWeighting::kUniform) {
    double positive, negative;
    pair_weights(weighting, static_cast<double>(in.rows), 0.0, &positive, &negative);
    *positive_weight = xla::Broadcast(xla::ConstantR0<double>(builder, positive), {in.rows});
    *negative_weight = xla::Broadcast(xla::ConstantR0<double>(builder, negative), {in.rows});
    return absl::OkStatus();
  }
  const PairBlock pairs{in.block, in.rows};
  const xla::XlaOp no_counts = xla::Zeros(builder, xla::ShapeUtil::MakeShape(xla::S64, {in.rows}));
  TF_ASSIGN_OR_RETURN(
      const std::vector<xla::XlaOp> counted,
      ForEachRowBlock(in.rows, in.block, {in.labels, no_counts}, "in_batch_positives",
                      [&](xla::XlaOp start, std::vector<xla::XlaOp> v,
                          xla::XlaBuilder*) -> absl::StatusOr<std::vector<xla::XlaOp>> {
                        xla::XlaOp same, other;
                        pairs.Masks(RowBlock(v[0], start, in.block), v[0], start, &same, &other);
                        const xla::XlaOp positives =
                            RowSums(xla::ConvertElementType(xla::And(same, other), xla::S64));
                        v[1] = SetRowBlock(v[1], positives, start);
                        return v;
                      }));
  const xla::XlaOp positives = xla::ConvertElementType(counted[1], xla::F64);
  pair_weights(weighting, xla::ScalarLike(positives, static_cast<double>(in.rows)), positives,
               positive_weight, negative_weight);
  return absl::OkStatus();
}

// q_I·E_I − M·E: the gradient of a block of anchors I (in_batch_math.h).
template <Distance K>
xla::XlaOp GradientBlock(xla::XlaOp m, xla::XlaOp s, xla::XlaOp stat_block, xla::XlaOp e_block,
                         xla::XlaOp e) {
  const xla::XlaOp q = diagonal_factor<K>(stat_block) * RowSums(diagonal_term<K>(m, s));
  const xla::Shape shape = e_block.builder()->GetShape(e_block).value();
  return xla::BroadcastInDim(q, shape.dimensions(), {0}) * e_block - PreciseDot(m, e, 1, 0);
}

// The sweep: each anchor's loss [B] and, when `upstream` ([B], the
// embeddings' type) is given, the gradient of Σ upstream_i·loss_i [B, D],
// grouped as the CPU kernel groups them (in_batch_cpu_impl.h): weights in
// float64, the pair coefficients' halves g_i·w_i in the compute type.
template <Distance K>
absl::Status InBatchSweep(const InBatchInputs& in, PairWeighting weighting,
                          const xla::XlaOp* upstream, xla::XlaOp* loss, xla::XlaOp* grad) {
  xla::XlaBuilder* builder = in.e.builder();
  const bool with_grad = upstream != nullptr;
  if (in.rows == 0) {
    *loss = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0}));
    if (with_grad) *grad = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0, in.dim}));
    return absl::OkStatus();
  }
  xla::XlaOp positive_weight, negative_weight;
  TF_RETURN_IF_ERROR(InBatchPairWeights(in, weighting, &positive_weight, &negative_weight));
  const xla::XlaOp centre = K == Distance::kEuclidean ? MeanRow(in.e, in.rows) : xla::XlaOp();
  // Cosine rows of extreme scale divided by 2^k (cosine_row_exponent), as the
  // kernels divide them, and their gradient rows too (below).
  const xla::XlaOp exponents =
      K == Distance::kCosine ? CosineRowExponents(RowMaxAbs(in.e, in.type), in.type)
                             : xla::XlaOp();
  const xla::XlaOp e = K == Distance::kEuclidean
                           ? LessRow(in.e, centre)
                           : ScaleRowsByPowerOfTwo(in.e, -exponents, in.type, in.rows, in.dim);
  const xla::XlaOp norm2 = RowSums(e * e);
  // The loop's values: inputs first, then what it writes, then the
  // gradient's inputs and output.
  enum { kE, kLabels, kStat, kPositiveWeight, kNegativeWeight, kMargin, kPositiveMargin, kLoss,
         kPositiveCoefficient, kNegativeCoefficient, kGrad };
  std::vector<xla::XlaOp> values = {
      e, in.labels, row_statistic<K>(norm2), positive_weight, negative_weight, in.margin,
      in.positive_margin, xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {in.rows}))};
  if (with_grad) {
    const xla::XlaOp g = xla::ConvertElementType(*upstream, xla::F64);
    values.push_back(xla::ConvertElementType(positive_weight * g, in.type));
    values.push_back(xla::ConvertElementType(negative_weight * g, in.type));
    values.push_back(xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim})));
  }
  // A float32 block with a pair whose Gram distance cancels about the mean
  // (gram_distance_cancels) takes its distances and gradient from float64
  // products of the rows less the mean (the subtraction exact in float64, the
  // products' rounding 2⁻²⁹ of float32's), so it reads the rows as given and
  // the mean; the other blocks (all of them in a batch without close rows far
  // from its mean) stay in float32.
  const bool can_widen = K == Distance::kEuclidean && in.type == xla::F32;
  const int raw = static_cast<int>(values.size());
  if (can_widen) values.insert(values.end(), {in.e, centre});
  const PairBlock pairs{in.block, in.rows};
  const auto body = [&](xla::XlaOp start, std::vector<xla::XlaOp> v,
                        xla::XlaBuilder*) -> absl::StatusOr<std::vector<xla::XlaOp>> {
    const auto block_of = [&](int value) { return RowBlock(v[value], start, in.block); };
    const xla::XlaOp e_block = block_of(kE);
    const xla::XlaOp s = PreciseDot(e_block, v[kE], 1, 1);
    xla::XlaOp same, other;
    pairs.Masks(block_of(kLabels), v[kLabels], start, &same, &other);
    // 1 or 0 per pair, as the kernel's masks.
    const xla::XlaOp positive = xla::ConvertElementType(xla::And(same, other), in.type);
    const xla::XlaOp negative = xla::ConvertElementType(xla::And(xla::Not(same), other), in.type);
    const xla::XlaOp stat_block = block_of(kStat);
    const xla::XlaOp stat_i = pairs.AlongRows(stat_block);
    const xla::XlaOp stat_j = pairs.AlongColumns(v[kStat]);
    xla::XlaOp d = pair_distance<K>(s, stat_i, stat_j);
    xla::XlaOp wide;
    if (can_widen) {
      const xla::XlaOp sums = stat_i + stat_j;
      const xla::XlaOp cancels = xla::Le(euclidean_squared(s, stat_i, stat_j),
                                         xla::ScalarLike(sums, GramCancellation<float>::value) *
                                             sums);
      wide = xla::Any(xla::And(other, cancels));
      const auto gram_distances = [&](const std::vector<xla::XlaOp>& x) {
        const xla::XlaOp rows_i = LessRow(x[0], x[2]);
        const xla::XlaOp rows_j = LessRow(x[1], x[2]);
        return pair_distance<K>(PreciseDot(rows_i, rows_j, 1, 1),
                                pairs.AlongRows(row_statistic<K>(RowSums(rows_i * rows_i))),
                                pairs.AlongColumns(row_statistic<K>(RowSums(rows_j * rows_j))));
      };
      const auto as_is = [](const std::vector<xla::XlaOp>& x) { return x[0]; };
      TF_ASSIGN_OR_RETURN(
          d, Choose(wide,
                    BranchOf{"in_float64", {block_of(raw), v[raw], v[raw + 1]}, xla::F64,
                             gram_distances},
                    BranchOf{"as_is", {d}, in.type, as_is}, in.type));
    }
    xla::XlaOp positive_t, positive_slope, negative_t, negative_slope;
    positive_term(d, v[kPositiveMargin], &positive_t, &positive_slope);
    negative_term(d, v[kMargin], &negative_t, &negative_slope);
    const auto f64 = [](xla::XlaOp x) { return xla::ConvertElementType(x, xla::F64); };
    const xla::XlaOp loss_block = xla::ConvertElementType(
        block_of(kPositiveWeight) * f64(RowSums(masked(positive, positive_t))) +
            block_of(kNegativeWeight) * f64(RowSums(masked(negative, negative_t))),
        in.type);
    v[kLoss] = SetRowBlock(v[kLoss], loss_block, start);
    if (!with_grad) return v;
    const auto pair_sum = [&](int value) {
      return pairs.AlongRows(block_of(value)) + pairs.AlongColumns(v[value]);
    };
    const xla::XlaOp coefficient =
        masked(positive, pair_sum(kPositiveCoefficient) * positive_slope) +
        masked(negative, pair_sum(kNegativeCoefficient) * negative_slope);
    const xla::XlaOp m = gram_coefficient<K>(coefficient, d, stat_i, stat_j);
    // x: m, s, stat_block, then the anchors' rows, all rows and (float64)
    // their centre.
    const auto gradient = [](const std::vector<xla::XlaOp>& x) {
      return x.size() == 5
                 ? GradientBlock<K>(x[0], x[1], x[2], x[3], x[4])
                 : GradientBlock<K>(x[0], x[1], x[2], LessRow(x[3], x[5]), LessRow(x[4], x[5]));
    };
    const std::vector<xla::XlaOp> narrow = {m, s, stat_block, e_block, v[kE]};
    xla::XlaOp grad_block = xla::XlaOp();
    if (can_widen) {
      TF_ASSIGN_OR_RETURN(
          grad_block,
          Choose(wide,
                 BranchOf{"in_float64", {m, s, stat_block, block_of(raw), v[raw], v[raw + 1]},
                          xla::F64, gradient},
                 BranchOf{"as_is", narrow, in.type, gradient}, in.type));
    } else {
      grad_block = gradient(narrow);
    }
    v[kGrad] = SetRowBlock(v[kGrad], grad_block, start);
    return v;
  };
  TF_ASSIGN_OR_RETURN(const std::vector<xla::XlaOp> out,
                      ForEachRowBlock(in.rows, in.block, values, "in_batch_sweep", body));
  *loss = out[kLoss];
  if (!with_grad) return absl::OkStatus();
  *grad = K == Distance::kCosine
              ? ScaleRowsByPowerOfTwo(out[kGrad], -exponents, in.type, in.rows, in.dim)
              : out[kGrad];
  return absl::OkStatus();
}

// The attrs all three in-batch lowerings read, and the dispatch on the
// distance.
class InBatchXlaOpBase : public tensorflow::XlaOpKernel {
 public:
  explicit InBatchXlaOpBase(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadInBatchAttrs(ctx, &distance_, &weighting_, &max_block_rows_));
  }

 protected:
  // f(DistanceTag<K>{}) for the op's distance and dtype, which the op
  // definitions restrict to what the kernels support.
  template <typename F>
  void Dispatch(tensorflow::XlaOpKernelContext* ctx, F&& f) {
    DType type;
    const bool supported =
        FromTf(ctx->input_type(1), &type) &&
        VisitInBatchKernel(type, distance_, [&](auto, auto k) { f(k); });
    OP_REQUIRES(ctx, supported,
                absl::InternalError("in-batch contrastive loss: unsupported dtype or distance"));
  }

  absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                          InBatchInputs* in) const {
    return ReadInBatchInputs(ctx, margin_input, max_block_rows_, in);
  }

  // For the host lowerings below: the checks of ReadInputs, the calls'
  // operands (labels, embeddings, the inputs `middle`, the margins) and the
  // attrs every handler reads, which XLA passes as int32.
  absl::Status HostOperands(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                            const std::vector<int>& middle, InBatchInputs* in,
                            std::vector<xla::XlaOp>* operands,
                            std::vector<std::pair<const char*, int>>* attrs) const {
    if (max_block_rows_ > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "in-batch contrastive loss: max_block_rows must be at most ",
          std::numeric_limits<int32_t>::max(), " under XLA, got ", max_block_rows_));
    }
    TF_RETURN_IF_ERROR(InBatchShapes(ctx, max_block_rows_, in));
    bool constant;
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, margin_input, &constant));
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, margin_input + 1, &constant, "positive_margin"));
    *operands = {ctx->Input(0), ctx->Input(1)};
    for (int input : middle) operands->push_back(ctx->Input(input));
    operands->insert(operands->end(), {ctx->Input(margin_input), ctx->Input(margin_input + 1)});
    *attrs = {{"distance", static_cast<int>(distance_)},
              {"pair_weighting", static_cast<int>(weighting_)},
              {"max_block_rows", static_cast<int>(max_block_rows_)}};
    return absl::OkStatus();
  }

  // The host lowerings below read them too.
  Distance distance_;
  PairWeighting weighting_;
  int64_t max_block_rows_;
};

class InBatchLossXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs(ctx, 2, &in));
      xla::XlaOp loss;
      OP_REQUIRES_OK(ctx, InBatchSweep<decltype(k)::value>(in, weighting_, nullptr, &loss,
                                                           nullptr));
      ctx->SetOutput(0, loss);
    });
  }
};

class InBatchGradXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &in));
      OP_REQUIRES_OK(ctx, CheckInBatchUpstream(ctx));
      const xla::XlaOp upstream = ctx->Input(2);
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(ctx, InBatchSweep<decltype(k)::value>(in, weighting_, &upstream, &loss,
                                                           &grad));
      ctx->SetOutput(0, grad);
    });
  }
};

// The reduced op: each anchor's upstream gradient g_i = weight_i ·
// reduction_scale, as InBatchLossReducedCpu sets it, and the loss reduced as
// the reduced embedding op reduces its rows.
class InBatchLossReducedXlaOp : public InBatchXlaOpBase {
 public:
  explicit InBatchLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx)
      : InBatchXlaOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs(ctx, 3, &in));
      const TensorShape weight_shape = ctx->InputShape(2);
      OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weight_shape, ctx->InputShape(0)));
      const bool scalar_weight = weight_shape.dims() == 0;
      const xla::XlaOp w = ctx->Input(2);
      const xla::XlaOp scale = ReductionScale(ctx, reduction_, w, scalar_weight, in.rows, 5);
      xla::XlaOp upstream = xla::ConvertElementType(xla::ConvertElementType(w, xla::F64) * scale,
                                                    in.type);
      if (scalar_weight) upstream = xla::Broadcast(upstream, {in.rows});
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(ctx, InBatchSweep<decltype(k)::value>(in, weighting_, &upstream, &loss,
                                                           &grad));
      ctx->SetOutput(0, ReducedLoss(BlockedSum(loss * w, in.rows, in.type), scale, in.type,
                                    in.type));
      ctx->SetOutput(1, grad);
      ctx->SetOutput(2, scale);
    });
  }

 protected:
  Reduction reduction_;
};

// --- The embedding ops on XLA's CPU backend ----------------------------------------------
// There they are custom calls of the fused CPU kernels, which read a and b
// once per op. XLA's code for the HLO above reads them once for the row sums
// and again for the gradients: about twice the time, as the ops are memory
// bound. The HLO stays the lowering for the other backends (GPU).

namespace ffi = ::xla::ffi;

// ParallelFor on the intra-op pool XLA lends FFI handlers, sharded by Eigen's
// cost model as the OpKernels' pool shards. Any thread may claim the next
// shard, the caller included, so the call finishes even when no pool thread
// is free (the caller may be one); a task that starts after the last shard
// was claimed finds nothing to do, and keeps only `state` alive.
ParallelFor HostParallelFor(ffi::ThreadPool& pool) {
  const int threads = static_cast<int>(pool.num_threads());
  return [&pool, threads](int64_t n, const ElementCost& cost, const ShardFn& work) {
    const int64_t shards = std::min<int64_t>(
        n, Eigen::TensorCostModel<Eigen::ThreadPoolDevice>::numThreads(
               static_cast<double>(n),
               Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored, cost.compute_cycles),
               threads));
    if (shards <= 1) {
      if (n > 0) work(0, n);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::mutex mu;
      std::condition_variable all_done;
      int64_t done = 0;
    };
    const auto state = std::make_shared<State>();
    const int64_t shard_size = (n + shards - 1) / shards;
    const auto run_shards = [state, &work, n, shards, shard_size] {
      for (int64_t s; (s = state->next.fetch_add(1)) < shards;) {
        work(s * shard_size, std::min(n, (s + 1) * shard_size));
        std::lock_guard<std::mutex> lock(state->mu);
        if (++state->done == shards) state->all_done.notify_one();
      }
    };
    for (int64_t i = 1; i < shards; ++i) pool.Schedule(std::function<void()>(run_shards));
    run_shards();
    std::unique_lock<std::mutex> lock(state->mu);
    state->all_done.wait(lock, [&state, shards] { return state->done == shards; });
  };
}

bool FromFfi(ffi::DataType type, DType* out) {
  const absl::StatusOr<tensorflow::DataType> tf_type =
      tensorflow::EncodePrimitiveTypeAsDataType(static_cast<xla::PrimitiveType>(type));
  return tf_type.ok() && FromTf(*tf_type, out);
}

// The lowerings only emit calls for dtypes the kernels support (the op
// definitions' lists), so a miss is a build defect, as in the OpKernels.
ffi::Error Dispatched(bool supported) {
  if (supported) return ffi::Error::Success();
  return ffi::Error::Internal("contrastive loss: a custom call has a dtype its kernel lacks");
}

// Runs a kernel entry on XLA's pool (RunKernel) once the handler has read its
// operands (`read`: false for a dtype the kernels lack).
template <typename Call>
ffi::Error RunHostKernel(ffi::ThreadPool& pool, bool read, const Call& call) {
  const KernelOutcome outcome =
      read ? RunKernel(HostParallelFor(pool), call) : KernelOutcome::kUnsupported;
  if (outcome == KernelOutcome::kOutOfMemory) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, kKernelOutOfMemory);
  }
  return Dispatched(outcome == KernelOutcome::kDone);
}

// The loss handlers' labels [rows], embeddings (a and b [rows, D] at a_data
// and b_data, rows row_stride apart; `embeddings` is one of their buffers)
// and margin; false for an unsupported dtype. The kernels need a valid
// margin: an invalid run-time one is passed as 0 and *margin_valid is false,
// for the caller to make its results NaN (the rule of CheckConstantMargin).
bool ReadHostInputs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings, const void* a_data,
                    const void* b_data, int64_t row_stride, ffi::BufferR0<ffi::F64> margin,
                    int32_t similar_label, int32_t distance, EmbeddingInputs* in,
                    bool* margin_valid) {
  in->labels = labels.untyped_data();
  in->a = a_data;
  in->b = b_data;
  in->rows = embeddings.dimensions()[0];
  in->dim = embeddings.dimensions()[embeddings.dimensions().size() - 1];
  in->row_stride = row_stride;
  *margin_valid = IsValidMargin(margin.typed_data()[0]);
  in->margin = *margin_valid ? margin.typed_data()[0] : 0.0;
  in->similar_label = similar_label;
  in->distance = static_cast<Distance>(distance);
  return FromFfi(labels.element_type(), &in->label_type) &&
         FromFfi(embeddings.element_type(), &in->embedding_type);
}

// Sets every value of `buffer` (of a floating-point dtype) to NaN.
void FillNan(ffi::AnyBuffer buffer) {
  DType type;
  if (!FromFfi(buffer.element_type(), &type)) return;
  VisitDistanceDType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::fill_n(static_cast<T*>(buffer.untyped_data()), buffer.element_count(),
                Store<T>::to(std::numeric_limits<ComputeType<T>>::quiet_NaN()));
  });
}

ffi::Error EmbeddingLossHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer a,
                             ffi::AnyBuffer b, ffi::BufferR0<ffi::F64> margin,
                             ffi::Result<ffi::AnyBuffer> loss,
                             ffi::Result<ffi::AnyBuffer> coefficients, int32_t distance,
                             int32_t similar_label) {
  EmbeddingInputs in;
  bool margin_valid;
  const bool read = ReadHostInputs(labels, a, a.untyped_data(), b.untyped_data(),
                                   a.dimensions()[1], margin, similar_label, distance, &in,
                                   &margin_valid);
  ffi::Error error = RunHostKernel(pool, read, [&](const ParallelFor& p) {
    return EmbeddingLossCpu(in, loss->untyped_data(),
                            static_cast<double*>(coefficients->untyped_data()), p);
  });
  if (error.success() && !margin_valid) {
    FillNan(*loss);
    FillNan(*coefficients);
  }
  return error;
}

ffi::Error EmbeddingGradHost(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                             ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                             ffi::Result<ffi::AnyBuffer> grad_a,
                             ffi::Result<ffi::AnyBuffer> grad_b, int32_t distance) {
  EmbeddingGradArgs args;
  args.a = a.untyped_data();
  args.b = b.untyped_data();
  args.rows = a.dimensions()[0];
  args.dim = a.dimensions()[1];
  args.row_stride = args.dim;
  args.distance = static_cast<Distance>(distance);
  args.coefficients = static_cast<const double*>(coefficients.untyped_data());
  args.upstream = upstream.untyped_data();
  args.scalar_upstream = upstream.dimensions().size() == 0;
  args.grad_a = grad_a->untyped_data();
  args.grad_b = grad_b->untyped_data();
  return RunHostKernel(pool, FromFfi(a.element_type(), &args.type),
                       [&](const ParallelFor& p) { return EmbeddingGradCpu(args, p); });
}

// The reduced handlers' common part, with args.in's embeddings and the
// gradient pointers set: the rest of args, the call, and NaN results for an
// invalid margin (`grads`: the gradient results).
ffi::Error RunReducedHost(ffi::ThreadPool pool, ReducedEmbeddingArgs& args, bool read_ok,
                          bool margin_valid, ffi::AnyBuffer weights,
                          ffi::BufferR0<ffi::F64> loss_scale, ffi::Result<ffi::AnyBuffer> loss,
                          ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t reduction,
                          std::initializer_list<ffi::AnyBuffer> grads) {
  args.weights = weights.untyped_data();
  args.scalar_weight = weights.dimensions().size() == 0;
  args.reduction = static_cast<Reduction>(reduction);
  args.loss_scale = loss_scale.typed_data()[0];
  args.loss = loss->untyped_data();
  args.reduction_scale = static_cast<double*>(reduction_scale->untyped_data());
  ffi::Error error = RunHostKernel(
      pool, read_ok, [&](const ParallelFor& p) { return EmbeddingLossReducedCpu(args, p); });
  // The reduction scale does not depend on the margin: it stays.
  if (error.success() && !margin_valid) {
    FillNan(*loss);
    for (const ffi::AnyBuffer& grad : grads) FillNan(grad);
  }
  return error;
}

ffi::Error EmbeddingLossReducedHost(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                                    ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer weights,
                                    ffi::BufferR0<ffi::F64> margin,
                                    ffi::BufferR0<ffi::F64> loss_scale,
                                    ffi::Result<ffi::AnyBuffer> loss,
                                    ffi::Result<ffi::AnyBuffer> grad_a,
                                    ffi::Result<ffi::AnyBuffer> grad_b,
                                    ffi::Result<ffi::AnyBuffer> reduction_scale,
                                    int32_t distance, int32_t reduction, int32_t similar_label) {
  ReducedEmbeddingArgs args;
  bool margin_valid;
  const bool read_ok = ReadHostInputs(labels, a, a.untyped_data(), b.untyped_data(),
                                      a.dimensions()[1], margin, similar_label, distance,
                                      &args.in, &margin_valid);
  args.grad_a = grad_a->untyped_data();
  args.grad_b = grad_b->untyped_data();
  return RunReducedHost(pool, args, read_ok, margin_valid, weights, loss_scale, loss,
                        reduction_scale, reduction, {*grad_a, *grad_b});
}

// The stacked-pair op's call: pairs and their gradient [rows, 2, D], read and
// written in place.
ffi::Error EmbeddingPairLossReducedHost(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                                        ffi::AnyBuffer pairs, ffi::AnyBuffer weights,
                                        ffi::BufferR0<ffi::F64> margin,
                                        ffi::BufferR0<ffi::F64> loss_scale,
                                        ffi::Result<ffi::AnyBuffer> loss,
                                        ffi::Result<ffi::AnyBuffer> grad,
                                        ffi::Result<ffi::AnyBuffer> reduction_scale,
                                        int32_t distance, int32_t reduction,
                                        int32_t similar_label) {
  ReducedEmbeddingArgs args;
  bool margin_valid;
  DType type;
  const int64_t dim = pairs.dimensions()[2];
  const bool read_ok =
      FromFfi(pairs.element_type(), &type) &&
      ReadHostInputs(labels, pairs, pairs.untyped_data(),
                     StackedPairB(type, pairs.untyped_data(), dim), 2 * dim, margin,
                     similar_label, distance, &args.in, &margin_valid);
  args.grad_a = grad->untyped_data();
  args.grad_b = StackedPairB(type, args.grad_a, dim);
  return RunReducedHost(pool, args, read_ok, margin_valid, weights, loss_scale, loss,
                        reduction_scale, reduction, {*grad});
}

// The operands and results of the calls are the lowerings' below: a and b as
// [rows, D], labels and per-row inputs as [rows] or scalars, margin and
// loss_scale float64 scalars.
constexpr char kEmbeddingTarget[] = "fused_contrastive_embedding_loss";
constexpr char kEmbeddingGradTarget[] = "fused_contrastive_embedding_loss_grad";
constexpr char kEmbeddingReducedTarget[] = "fused_contrastive_embedding_loss_reduced";
constexpr char kEmbeddingPairReducedTarget[] = "fused_contrastive_embedding_pair_loss_reduced";

XLA_FFI_DEFINE_HANDLER(kEmbeddingHandler, EmbeddingLossHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()           // labels
                           .Arg<ffi::AnyBuffer>()           // a
                           .Arg<ffi::AnyBuffer>()           // b
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Ret<ffi::AnyBuffer>()           // loss
                           .Ret<ffi::AnyBuffer>()           // coefficients
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("similar_label"));

XLA_FFI_DEFINE_HANDLER(kEmbeddingGradHandler, EmbeddingGradHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()  // a
                           .Arg<ffi::AnyBuffer>()  // b
                           .Arg<ffi::AnyBuffer>()  // coefficients
                           .Arg<ffi::AnyBuffer>()  // upstream
                           .Ret<ffi::AnyBuffer>()  // grad_a
                           .Ret<ffi::AnyBuffer>()  // grad_b
                           .Attr<int32_t>("distance"));

XLA_FFI_DEFINE_HANDLER(kEmbeddingReducedHandler, EmbeddingLossReducedHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()           // labels
                           .Arg<ffi::AnyBuffer>()           // a
                           .Arg<ffi::AnyBuffer>()           // b
                           .Arg<ffi::AnyBuffer>()           // sample_weight
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                           .Ret<ffi::AnyBuffer>()           // loss
                           .Ret<ffi::AnyBuffer>()           // grad_a
                           .Ret<ffi::AnyBuffer>()           // grad_b
                           .Ret<ffi::AnyBuffer>()           // reduction_scale
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("reduction")
                           .Attr<int32_t>("similar_label"));

XLA_FFI_DEFINE_HANDLER(kEmbeddingPairReducedHandler, EmbeddingPairLossReducedHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::AnyBuffer>()           // labels
                           .Arg<ffi::AnyBuffer>()           // pairs
                           .Arg<ffi::AnyBuffer>()           // sample_weight
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                           .Ret<ffi::AnyBuffer>()           // loss
                           .Ret<ffi::AnyBuffer>()           // grad
                           .Ret<ffi::AnyBuffer>()           // reduction_scale
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("reduction")
                           .Attr<int32_t>("similar_label"));

XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kEmbeddingTarget, "Host", kEmbeddingHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kEmbeddingGradTarget, "Host", kEmbeddingGradHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kEmbeddingReducedTarget, "Host",
                         kEmbeddingReducedHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kEmbeddingPairReducedTarget, "Host",
                         kEmbeddingPairReducedHandler);

// A typed-FFI custom call of `target`; returns its results, of `shapes`.
// attrs become the MLIR dictionary XLA decodes for the handler's Attr<int32_t>.
std::vector<xla::XlaOp> HostCall(tensorflow::XlaOpKernelContext* ctx, const char* target,
                                 const std::vector<xla::XlaOp>& operands,
                                 const std::vector<xla::Shape>& shapes,
                                 const std::vector<std::pair<const char*, int>>& attrs) {
  std::string dictionary;
  for (const auto& [name, value] : attrs) {
    absl::StrAppend(&dictionary, dictionary.empty() ? "{" : ", ", name, " = ", value, " : i32");
  }
  absl::StrAppend(&dictionary, "}");
  const xla::XlaOp call = xla::CustomCall(
      ctx->builder(), target, operands, xla::ShapeUtil::MakeTupleShape(shapes), dictionary,
      /*has_side_effect=*/false, /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE, xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  std::vector<xla::XlaOp> results;
  for (int i = 0; i < static_cast<int>(shapes.size()); ++i) {
    results.push_back(xla::GetTupleElement(call, i));
  }
  return results;
}

// Embeddings a and b (inputs `first`, `first` + 1) as [rows, D], in their dtype.
std::vector<xla::XlaOp> EmbeddingMatrices(tensorflow::XlaOpKernelContext* ctx,
                                          const EmbeddingRows& e, int first) {
  return {xla::Reshape(ctx->Input(first), {e.rows, e.dim}),
          xla::Reshape(ctx->Input(first + 1), {e.rows, e.dim})};
}

xla::Shape EmbeddingMatrixShape(const EmbeddingRows& e) {
  return xla::ShapeUtil::MakeShape(e.out_type, {e.rows, e.dim});
}

// The loss ops' checks, as their HLO lowerings check, and the calls' first
// operands: labels [rows], a, b [rows, D] (or the stacked pair [rows, 2, D]).
absl::Status HostLossOperands(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                              EmbeddingRows* e, std::vector<xla::XlaOp>* operands,
                              bool stacked = false) {
  bool constant_margin;
  TF_RETURN_IF_ERROR(CheckEmbeddingOrPairShapes(ctx, stacked));
  TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, margin_input, &constant_margin));
  *e = EmbeddingRowShapes(ctx, 1, stacked);
  *operands = stacked ? std::vector<xla::XlaOp>{xla::Reshape(ctx->Input(1), {e->rows, 2, e->dim})}
                      : EmbeddingMatrices(ctx, *e, 1);
  operands->insert(operands->begin(), PerRow(ctx, 0, *e, ctx->input_xla_type(0)));
  return absl::OkStatus();
}

// FUSED_CONTRASTIVE_XLA_CPU_HLO=1 keeps the HLO lowering on the CPU backend
// too, so that the GPU backend's lowering is tested where there is no GPU
// (tests/test_xla.py runs its embedding tests so in a subprocess).
const bool kHloOnCpu = [] {
  const char* value = std::getenv("FUSED_CONTRASTIVE_XLA_CPU_HLO");
  return value != nullptr && std::string(value) == "1";
}();

class EmbeddingLossHostXlaOp : public EmbeddingLossXlaOp {
 public:
  using EmbeddingLossXlaOp::EmbeddingLossXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return EmbeddingLossXlaOp::Compile(ctx);
    EmbeddingRows e;
    std::vector<xla::XlaOp> operands;
    OP_REQUIRES_OK(ctx, HostLossOperands(ctx, 3, &e, &operands));
    operands.push_back(ctx->Input(3));
    const int64_t coefficients = NumRowCoefficients(distance_);
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kEmbeddingTarget, operands,
                 {xla::ShapeUtil::MakeShape(e.out_type, {e.rows}),
                  xla::ShapeUtil::MakeShape(xla::F64, {e.rows, coefficients})},
                 {{"distance", static_cast<int>(distance_)}, {"similar_label", similar_label_}});
    TensorShape coefficient_shape = e.row_shape;
    coefficient_shape.AddDim(coefficients);
    ctx->SetOutput(0, xla::Reshape(out[0], e.row_shape.dim_sizes()));
    ctx->SetOutput(1, xla::Reshape(out[1], coefficient_shape.dim_sizes()));
  }
};

class EmbeddingGradHostXlaOp : public EmbeddingGradXlaOp {
 public:
  using EmbeddingGradXlaOp::EmbeddingGradXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return EmbeddingGradXlaOp::Compile(ctx);
    OP_REQUIRES_OK(ctx, CheckGradShapes(ctx, distance_));
    const EmbeddingRows e = EmbeddingRowShapes(ctx, 0);
    std::vector<xla::XlaOp> operands = EmbeddingMatrices(ctx, e, 0);
    operands.push_back(
        xla::Reshape(ctx->Input(2), {e.rows, int64_t{NumRowCoefficients(distance_)}}));
    operands.push_back(PerRow(ctx, 3, e, e.out_type));
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kEmbeddingGradTarget, operands,
                 {EmbeddingMatrixShape(e), EmbeddingMatrixShape(e)},
                 {{"distance", static_cast<int>(distance_)}});
    SetGradientOutputs(ctx, e, out.data(), 0);
  }
};

class EmbeddingLossReducedHostXlaOp : public EmbeddingLossReducedXlaOp {
 public:
  using EmbeddingLossReducedXlaOp::EmbeddingLossReducedXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return EmbeddingLossReducedXlaOp::Compile(ctx);
    const int weights = weights_input();
    EmbeddingRows e;
    std::vector<xla::XlaOp> operands;
    OP_REQUIRES_OK(ctx, HostLossOperands(ctx, weights + 1, &e, &operands, stacked_));
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", ctx->InputShape(weights), e.row_shape));
    operands.insert(operands.end(), {PerRow(ctx, weights, e, e.out_type),
                                     ctx->Input(weights + 1), ctx->Input(weights + 2)});
    std::vector<xla::Shape> shapes = {xla::ShapeUtil::MakeShape(e.out_type, {})};
    if (stacked_) {
      shapes.push_back(xla::ShapeUtil::MakeShape(e.out_type, {e.rows, 2, e.dim}));
    } else {
      shapes.insert(shapes.end(), {EmbeddingMatrixShape(e), EmbeddingMatrixShape(e)});
    }
    shapes.push_back(xla::ShapeUtil::MakeShape(xla::F64, {}));
    const std::vector<xla::XlaOp> out = HostCall(
        ctx, stacked_ ? kEmbeddingPairReducedTarget : kEmbeddingReducedTarget, operands, shapes,
        {{"distance", static_cast<int>(distance_)},
         {"reduction", static_cast<int>(reduction_)},
         {"similar_label", similar_label_}});
    ctx->SetOutput(0, out[0]);
    if (stacked_) {
      ctx->SetOutput(1, xla::Reshape(out[1], e.shape.dim_sizes()));
    } else {
      SetGradientOutputs(ctx, e, &out[1], 1);
    }
    ctx->SetOutput(scale_output(), out.back());
  }
};

// --- The in-batch ops on XLA's CPU backend: calls of InBatchLossCpu ----------------------
// The kernel's exact path for cancelling pairs and its symmetric sweep (each
// unordered pair of blocks once, half the HLO's products) are out of the
// HLO's reach; and its results do not depend on the thread count, so the
// calls give the OpKernels' bits.

// The in-batch handlers' labels, embeddings [B, D], margins and attrs; false
// for an unsupported dtype. Invalid run-time margins are passed as 0 and
// *margins_valid is false (the rule of ReadHostInputs).
bool ReadInBatchHostInputs(ffi::BufferR1<ffi::S64> labels, ffi::AnyBuffer embeddings,
                           ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> positive_margin,
                           int32_t distance, int32_t pair_weighting, int32_t max_block_rows,
                           InBatchArgs* args, bool* margins_valid) {
  const double margin_value = margin.typed_data()[0];
  const double positive_margin_value = positive_margin.typed_data()[0];
  *margins_valid = IsValidMargin(margin_value) && IsValidMargin(positive_margin_value);
  args->labels = labels.typed_data();
  args->embeddings = embeddings.untyped_data();
  args->rows = embeddings.dimensions()[0];
  args->dim = embeddings.dimensions()[1];
  args->margin = *margins_valid ? margin_value : 0.0;
  args->positive_margin = *margins_valid ? positive_margin_value : 0.0;
  args->distance = static_cast<Distance>(distance);
  args->weighting = static_cast<PairWeighting>(pair_weighting);
  args->max_block_rows = max_block_rows;
  args->upstream = nullptr;
  args->loss = nullptr;
  args->grad = nullptr;
  return FromFfi(embeddings.element_type(), &args->type) && IsInBatchDType(args->type);
}

ffi::Error InBatchLossHost(ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels,
                           ffi::AnyBuffer embeddings, ffi::BufferR0<ffi::F64> margin,
                           ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> loss, int32_t distance,
                           int32_t pair_weighting, int32_t max_block_rows) {
  InBatchArgs args;
  bool margins_valid;
  const bool read = ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance,
                                          pair_weighting, max_block_rows, &args, &margins_valid);
  args.loss = loss->untyped_data();
  ffi::Error error =
      RunHostKernel(pool, read, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  if (error.success() && !margins_valid) FillNan(*loss);
  return error;
}

ffi::Error InBatchGradHost(ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels,
                           ffi::AnyBuffer embeddings, ffi::AnyBuffer upstream,
                           ffi::BufferR0<ffi::F64> margin,
                           ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> grad, int32_t distance,
                           int32_t pair_weighting, int32_t max_block_rows) {
  InBatchArgs args;
  bool margins_valid;
  const bool read = ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance,
                                          pair_weighting, max_block_rows, &args, &margins_valid);
  args.upstream = upstream.untyped_data();
  args.grad = grad->untyped_data();
  ffi::Error error =
      RunHostKernel(pool, read, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  if (error.success() && !margins_valid) FillNan(*grad);
  return error;
}

ffi::Error InBatchLossReducedHost(ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels,
                                  ffi::AnyBuffer embeddings, ffi::AnyBuffer weights,
                                  ffi::BufferR0<ffi::F64> margin,
                                  ffi::BufferR0<ffi::F64> positive_margin,
                                  ffi::BufferR0<ffi::F64> loss_scale,
                                  ffi::Result<ffi::AnyBuffer> loss,
                                  ffi::Result<ffi::AnyBuffer> grad,
                                  ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t distance,
                                  int32_t pair_weighting, int32_t max_block_rows,
                                  int32_t reduction) {
  InBatchReducedArgs args;
  bool margins_valid;
  const bool read = ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance,
                                          pair_weighting, max_block_rows, &args.in,
                                          &margins_valid);
  args.weights = weights.untyped_data();
  args.scalar_weight = weights.dimensions().size() == 0;
  args.reduction = static_cast<Reduction>(reduction);
  args.loss_scale = loss_scale.typed_data()[0];
  args.loss = loss->untyped_data();
  args.grad = grad->untyped_data();
  args.reduction_scale = static_cast<double*>(reduction_scale->untyped_data());
  ffi::Error error = RunHostKernel(
      pool, read, [&](const ParallelFor& p) { return InBatchLossReducedCpu(args, p); });
  // The reduction scale does not depend on the margins: it stays.
  if (error.success() && !margins_valid) {
    FillNan(*loss);
    FillNan(*grad);
  }
  return error;
}

// The operands and results of the calls are the lowerings' below: labels
// int64 [B], embeddings [B, D], upstream [B], sample_weight [B] or scalar,
// margins and loss_scale float64 scalars.
constexpr char kInBatchTarget[] = "fused_contrastive_in_batch_loss";
constexpr char kInBatchGradTarget[] = "fused_contrastive_in_batch_loss_grad";
constexpr char kInBatchReducedTarget[] = "fused_contrastive_in_batch_loss_reduced";

XLA_FFI_DEFINE_HANDLER(kInBatchHandler, InBatchLossHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                           .Arg<ffi::AnyBuffer>()           // embeddings
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                           .Ret<ffi::AnyBuffer>()           // loss
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("pair_weighting")
                           .Attr<int32_t>("max_block_rows"));

XLA_FFI_DEFINE_HANDLER(kInBatchGradHandler, InBatchGradHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                           .Arg<ffi::AnyBuffer>()           // embeddings
                           .Arg<ffi::AnyBuffer>()           // upstream
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                           .Ret<ffi::AnyBuffer>()           // grad
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("pair_weighting")
                           .Attr<int32_t>("max_block_rows"));

XLA_FFI_DEFINE_HANDLER(kInBatchReducedHandler, InBatchLossReducedHost,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()
                           .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                           .Arg<ffi::AnyBuffer>()           // embeddings
                           .Arg<ffi::AnyBuffer>()           // sample_weight
                           .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                           .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                           .Ret<ffi::AnyBuffer>()           // loss
                           .Ret<ffi::AnyBuffer>()           // grad
                           .Ret<ffi::AnyBuffer>()           // reduction_scale
                           .Attr<int32_t>("distance")
                           .Attr<int32_t>("pair_weighting")
                           .Attr<int32_t>("max_block_rows")
                           .Attr<int32_t>("reduction"));

XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kInBatchTarget, "Host", kInBatchHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kInBatchGradTarget, "Host", kInBatchGradHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kInBatchReducedTarget, "Host",
                         kInBatchReducedHandler);

class InBatchLossHostXlaOp : public InBatchLossXlaOp {
 public:
  using InBatchLossXlaOp::InBatchLossXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return InBatchLossXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, HostOperands(ctx, 2, {}, &in, &operands, &attrs));
    ctx->SetOutput(0, HostCall(ctx, kInBatchTarget, operands,
                               {xla::ShapeUtil::MakeShape(in.type, {in.rows})}, attrs)[0]);
  }
};

class InBatchGradHostXlaOp : public InBatchGradXlaOp {
 public:
  using InBatchGradXlaOp::InBatchGradXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return InBatchGradXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, CheckInBatchUpstream(ctx));
    OP_REQUIRES_OK(ctx, HostOperands(ctx, 3, {2}, &in, &operands, &attrs));
    ctx->SetOutput(0, HostCall(ctx, kInBatchGradTarget, operands,
                               {xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim})},
                               attrs)[0]);
  }
};

class InBatchLossReducedHostXlaOp : public InBatchLossReducedXlaOp {
 public:
  using InBatchLossReducedXlaOp::InBatchLossReducedXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (kHloOnCpu) return InBatchLossReducedXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", ctx->InputShape(2), ctx->InputShape(0)));
    OP_REQUIRES_OK(ctx, HostOperands(ctx, 3, {2}, &in, &operands, &attrs));
    operands.push_back(ctx->Input(5));
    attrs.emplace_back("reduction", static_cast<int>(reduction_));
    const std::vector<xla::XlaOp> out = HostCall(
        ctx, kInBatchReducedTarget, operands,
        {xla::ShapeUtil::MakeShape(in.type, {}),
         xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim}),
         xla::ShapeUtil::MakeShape(xla::F64, {})},
        attrs);
    for (int i = 0; i < 3; ++i) ctx->SetOutput(i, out[i]);
  }
};

REGISTER_XLA_OP(Name(kOpName), ContrastiveLossXlaOp);
REGISTER_XLA_OP(Name(kReducedOpName), ContrastiveLossReducedXlaOp);
REGISTER_XLA_OP(Name(kScaleOpName), ScaleGradientXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingOpName), EmbeddingLossXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingGradOpName), EmbeddingGradXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingReducedOpName), EmbeddingLossReducedXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingPairReducedOpName), EmbeddingLossReducedXlaOp);
// A registration for one device takes precedence over the one for all.
REGISTER_XLA_OP(Name(kEmbeddingOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                EmbeddingLossHostXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingGradOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                EmbeddingGradHostXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingReducedOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                EmbeddingLossReducedHostXlaOp);
REGISTER_XLA_OP(Name(kEmbeddingPairReducedOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                EmbeddingLossReducedHostXlaOp);
REGISTER_XLA_OP(Name(kInBatchOpName), InBatchLossXlaOp);
REGISTER_XLA_OP(Name(kInBatchGradOpName), InBatchGradXlaOp);
REGISTER_XLA_OP(Name(kInBatchReducedOpName), InBatchLossReducedXlaOp);
REGISTER_XLA_OP(Name(kInBatchOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                InBatchLossHostXlaOp);
REGISTER_XLA_OP(Name(kInBatchGradOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                InBatchGradHostXlaOp);
REGISTER_XLA_OP(Name(kInBatchReducedOpName).Device(tensorflow::DEVICE_CPU_XLA_JIT),
                InBatchLossReducedHostXlaOp);

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

// An embedding or in-batch op's lowering for `backend`, as the registrations
// above pick.
template <typename HloOp, typename HostOp>
void RegisterJitKernels(const std::string& backend, const char* op, const char* hlo_name,
                        const char* host_name, bool typed_labels,
                        bool (*value_types)(DType) = IsDistanceDType) {
  if (backend == tensorflow::DEVICE_CPU_XLA_JIT) {
    RegisterKernels<HostOp>(op, backend.c_str(), host_name, typed_labels, {}, value_types);
  } else {
    RegisterKernels<HloOp>(op, backend.c_str(), hlo_name, typed_labels, {}, value_types);
  }
}

const bool kLateJitKernelsRegistered = [] {
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (!JitKernelsRegistered(backend)) continue;
    const char* device = backend.c_str();
    RegisterKernels<ContrastiveLossXlaOp>(kOpName, device, "ContrastiveLossXlaOp", true, {});
    RegisterKernels<ContrastiveLossReducedXlaOp>(kReducedOpName, device,
                                                 "ContrastiveLossReducedXlaOp", true, {});
    RegisterKernels<ScaleGradientXlaOp>(kScaleOpName, device, "ScaleGradientXlaOp", false, {});
    RegisterJitKernels<EmbeddingLossXlaOp, EmbeddingLossHostXlaOp>(
        backend, kEmbeddingOpName, "EmbeddingLossXlaOp", "EmbeddingLossHostXlaOp", true);
    RegisterJitKernels<EmbeddingGradXlaOp, EmbeddingGradHostXlaOp>(
        backend, kEmbeddingGradOpName, "EmbeddingGradXlaOp", "EmbeddingGradHostXlaOp", false);
    for (const char* op : {kEmbeddingReducedOpName, kEmbeddingPairReducedOpName}) {
      RegisterJitKernels<EmbeddingLossReducedXlaOp, EmbeddingLossReducedHostXlaOp>(
          backend, op, "EmbeddingLossReducedXlaOp", "EmbeddingLossReducedHostXlaOp", true);
    }
    RegisterJitKernels<InBatchLossXlaOp, InBatchLossHostXlaOp>(
        backend, kInBatchOpName, "InBatchLossXlaOp", "InBatchLossHostXlaOp", false,
        IsInBatchDType);
    RegisterJitKernels<InBatchGradXlaOp, InBatchGradHostXlaOp>(
        backend, kInBatchGradOpName, "InBatchGradXlaOp", "InBatchGradHostXlaOp", false,
        IsInBatchDType);
    RegisterJitKernels<InBatchLossReducedXlaOp, InBatchLossReducedHostXlaOp>(
        backend, kInBatchReducedOpName, "InBatchLossReducedXlaOp",
        "InBatchLossReducedHostXlaOp", false, IsInBatchDType);
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
