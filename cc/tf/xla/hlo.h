// What every family's HLO lowering shares: the formula's element operations
// on XlaOps (so the core headers' formula is the HLO itself), inputs in the
// compute type, the reductions' float64 sums, conditionals, power-of-two row
// scaling and loops over blocks of rows.
#ifndef FUSED_CONTRASTIVE_TF_XLA_HLO_H_
#define FUSED_CONTRASTIVE_TF_XLA_HLO_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/common/element_ops.h"
#include "core/common/reduction.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/lib/loops.h"
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
  static xla::XlaOp nonzero(const xla::XlaOp& x) {
    return xla::Select(xla::Ne(x, constant(x, 0)), constant(x, 1), constant(x, 0));
  }
  static xla::XlaOp at_most(const xla::XlaOp& x, const xla::XlaOp& y) {
    return xla::Select(xla::Le(x, y), xla::FullLike(x, 1), xla::ZerosLike(x));
  }
};

// --- Inputs --------------------------------------------------------------------

// The type the formula is evaluated in for a loss of type `type`, as
// ComputeType<T> of the kernels: float32 for the 16-bit types.
xla::PrimitiveType XlaComputeType(xla::PrimitiveType type);

// A constant margin is checked at compile time; *constant says whether it was
// one. XLA programs cannot raise at run time, so a margin known only then (a
// variable) that is negative or not finite makes the loss and gradient NaN,
// never a silently wrong number.
absl::Status CheckConstantMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 bool* constant, const char* what = "margin");

// A margin input in the compute type, an invalid run-time one as NaN
// (CheckConstantMargin).
absl::Status ReadMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        xla::PrimitiveType compute, xla::XlaOp* margin,
                        const char* what = "margin");

// A loss op's labels and margin in the compute type.
absl::Status ReadLabelsAndMargin(tensorflow::XlaOpKernelContext* ctx, int labels_input,
                                 int margin_input, xla::PrimitiveType compute, xla::XlaOp* y,
                                 xla::XlaOp* margin);

// --- Reductions ----------------------------------------------------------------

// Sum of every element of x (of the compute type) in float64: chunks of
// kFloatSumChunk elements summed in float32, their sums in float64. Chunks of
// at most 32 escape XLA's tree-reduction rewrite, so the chunk sums are one
// loop fusion with the loss itself, and no [n] loss array is written (XLA's
// own float32 sum of the plain formula writes and reads one).
xla::XlaOp BlockedSum(xla::XlaOp x, int64_t n, xla::PrimitiveType compute);

// reduction_scale() of core/common/reduction.h for n losses with weights w
// (one per loss or a scalar), in float64. `count`, a float64 scalar, stands
// for n where the count is known only at run time (a scalar weight's losses).
xla::XlaOp ReductionScale(tensorflow::XlaOpKernelContext* ctx, Reduction reduction, xla::XlaOp w,
                          bool scalar_weight, int64_t n, int loss_scale_input,
                          xla::XlaOp count = xla::XlaOp());

// The reduced loss output: total * scale rounded to the compute type first,
// then to the output type, as the kernels store it.
xla::XlaOp ReducedLoss(xla::XlaOp total, xla::XlaOp scale, xla::PrimitiveType compute,
                       xla::PrimitiveType out_type);

// --- Conditionals --------------------------------------------------------------

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
                                  const BranchOf<Otherwise>& otherwise, xla::PrimitiveType type) {
  xla::XlaBuilder* builder = pred.builder();
  TF_ASSIGN_OR_RETURN(const xla::XlaComputation when_branch,
                      Branch(builder, when.name, when.operands, when.compute, type, when.f));
  TF_ASSIGN_OR_RETURN(
      const xla::XlaComputation otherwise_branch,
      Branch(builder, otherwise.name, otherwise.operands, otherwise.compute, type, otherwise.f));
  return xla::Conditional(pred, xla::Tuple(builder, when.operands), when_branch,
                          xla::Tuple(builder, otherwise.operands), otherwise_branch);
}

// --- Cosine's row scaling (CosineScaling, cosine_row_exponent) -----------------

// The largest |element| of each row of x [rows, D]: [rows] (NaN rows NaN).
xla::XlaOp RowMaxAbs(xla::XlaOp x, xla::PrimitiveType type);

// cosine_scale of each row's max_abs [rows] (the embedding kernels' s_a, s_b).
xla::XlaOp CosineScales(xla::XlaOp max_abs, xla::PrimitiveType type);

// cosine_row_exponent of each row's max_abs [rows]: S32, 0 for rows used as
// they are.
xla::XlaOp CosineRowExponents(xla::XlaOp max_abs, xla::PrimitiveType type);

// x [rows, D] with row i multiplied by 2^e_i (e [rows], S32), exactly (as
// ldexp) for |e_i| up to twice the exponent range.
xla::XlaOp ScaleRowsByPowerOfTwo(xla::XlaOp x, xla::XlaOp e, xla::PrimitiveType type, int64_t rows,
                                 int64_t dim);

// --- Blocks of rows --------------------------------------------------------------

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
xla::XlaOp RowBlock(xla::XlaOp x, xla::XlaOp start, int64_t block);

xla::XlaOp SetRowBlock(xla::XlaOp x, xla::XlaOp block_values, xla::XlaOp start);

// Sum along the last axis of an [R, B] block.
xla::XlaOp RowSums(xla::XlaOp x);

// The mean row [D] of x [B, D] (B > 0).
xla::XlaOp MeanRow(xla::XlaOp x, int64_t rows);

// x [R, D] less the row `centre` [D].
xla::XlaOp LessRow(xla::XlaOp x, xla::XlaOp centre);

// Products at full precision: XLA's GPU backend may otherwise take float32
// dots in TF32, whose rounding the Euclidean Gram formula would magnify.
xla::XlaOp PreciseDot(xla::XlaOp a, xla::XlaOp b, int64_t a_contract, int64_t b_contract);

// --- Host calls (XLA's CPU backend; handlers in ffi/) --------------------------

// FUSED_CONTRASTIVE_XLA_CPU_HLO=1 keeps the HLO lowering on the CPU backend
// too, so that the GPU backend's lowering is tested where there is no GPU
// (the XLA tests rerun so in a subprocess).
bool HloOnCpu();

// A typed-FFI custom call of `target`; returns its results, of `shapes`.
// attrs become the MLIR dictionary XLA decodes for the handler's Attr<int32_t>.
std::vector<xla::XlaOp> HostCall(tensorflow::XlaOpKernelContext* ctx, const char* target,
                                 const std::vector<xla::XlaOp>& operands,
                                 const std::vector<xla::Shape>& shapes,
                                 const std::vector<std::pair<const char*, int>>& attrs);

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_XLA_HLO_H_
