// What every family's HLO lowering shares (xla/hlo.h).
#include "tf/xla/hlo.h"

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/common/formula.h"
#include "core/in_batch/math.h"
#include "core/pairs/math.h"
#include "tf/names.h"
#include "xla/hlo/builder/lib/arithmetic.h"

namespace fused_contrastive {

xla::PrimitiveType XlaComputeType(xla::PrimitiveType type) {
  return (type == xla::F16 || type == xla::BF16) ? xla::F32 : type;
}

absl::Status CheckConstantMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                                 bool* constant, const char* what) {
  double margin_value;
  *constant = ctx->ConstantInputAsFloatScalar(margin_input, &margin_value).ok();
  return *constant ? CheckMargin(margin_value, what) : absl::OkStatus();
}

absl::Status ReadMargin(tensorflow::XlaOpKernelContext* ctx, int margin_input,
                        xla::PrimitiveType compute, xla::XlaOp* margin, const char* what) {
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

namespace {

// XLA takes a bool's byte to be 0 or 1, and its fused code may read the low
// bit only; a byte such as 2 (tf.io.decode_raw) must still be true, as in the
// CPU and GPU kernels. Widening the byte and comparing it with 0 reads all of
// it.
xla::XlaOp LabelsToCompute(xla::XlaOp labels, xla::PrimitiveType label_type,
                           xla::PrimitiveType compute) {
  if (label_type == xla::PRED) {
    const xla::XlaOp bytes = xla::ConvertElementType(labels, xla::U8);
    labels = xla::Ne(bytes, xla::ScalarLike(bytes, 0));
  }
  return xla::ConvertElementType(labels, compute);
}

}  // namespace

absl::Status ReadLabelsAndMargin(tensorflow::XlaOpKernelContext* ctx, int labels_input,
                                 int margin_input, xla::PrimitiveType compute, xla::XlaOp* y,
                                 xla::XlaOp* margin) {
  TF_RETURN_IF_ERROR(ReadMargin(ctx, margin_input, compute, margin));
  *y = LabelsToCompute(ctx->Input(labels_input), ctx->input_xla_type(labels_input), compute);
  return absl::OkStatus();
}

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

xla::XlaOp ReductionScale(tensorflow::XlaOpKernelContext* ctx, Reduction reduction, xla::XlaOp w,
                          bool scalar_weight, int64_t n, int loss_scale_input, xla::XlaOp count) {
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
  if (!count.valid()) count = xla::ConstantR0<double>(builder, static_cast<double>(n));
  return reduction_scale(reduction, count, weight_total, ctx->Input(loss_scale_input));
}

xla::XlaOp ReducedLoss(xla::XlaOp total, xla::XlaOp scale, xla::PrimitiveType compute,
                       xla::PrimitiveType out_type) {
  return xla::ConvertElementType(xla::ConvertElementType(total * scale, compute), out_type);
}

// --- Cosine's row scaling -------------------------------------------------------
// XLA has no frexp or ldexp; for F32 and F64 rows they are read from and
// written into the floats' bits.

namespace {

struct FloatBits {
  xla::PrimitiveType integer;
  int mantissa_bits, bias;
  double min_normal;
};

FloatBits BitsOf(xla::PrimitiveType type) {
  return type == xla::F64 ? FloatBits{xla::S64, 52, 1023, std::numeric_limits<double>::min()}
                          : FloatBits{xla::S32, 23, 127, std::numeric_limits<float>::min()};
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

}  // namespace

xla::XlaOp RowMaxAbs(xla::XlaOp x, xla::PrimitiveType type) {
  xla::XlaBuilder* builder = x.builder();
  return xla::Reduce(xla::Abs(x), xla::Zero(builder, type),
                     xla::CreateScalarMaxComputation(type, builder), {1});
}

xla::XlaOp CosineScales(xla::XlaOp max_abs, xla::PrimitiveType type) {
  const int limit =
      type == xla::F64 ? CosineScaling<double>::kMaxShift : CosineScaling<float>::kMaxShift;
  const xla::XlaOp shift = xla::Clamp(xla::ConstantR0<int32_t>(max_abs.builder(), -limit),
                                      -BinaryExponent(max_abs, type),
                                      xla::ConstantR0<int32_t>(max_abs.builder(), limit));
  return xla::Select(PositiveFinite(max_abs), PowerOfTwo(shift, type), xla::FullLike(max_abs, 1));
}

xla::XlaOp CosineRowExponents(xla::XlaOp max_abs, xla::PrimitiveType type) {
  const xla::XlaOp k = BinaryExponent(max_abs, type);
  const xla::XlaOp limit = xla::ScalarLike(k, kCosineRowExponentLimit);
  const xla::XlaOp extreme = xla::And(PositiveFinite(max_abs), xla::Gt(xla::Abs(k), limit));
  return xla::Select(extreme, k, xla::ZerosLike(k));
}

// In two steps of half of e_i each, so that each factor is a normal number.
xla::XlaOp ScaleRowsByPowerOfTwo(xla::XlaOp x, xla::XlaOp e, xla::PrimitiveType type, int64_t rows,
                                 int64_t dim) {
  const xla::XlaOp half = xla::Div(e, xla::ScalarLike(e, 2));
  for (const xla::XlaOp& step : {half, e - half}) {
    x = x * xla::BroadcastInDim(PowerOfTwo(step, type), {rows, dim}, {0});
  }
  return x;
}

// --- Blocks of rows --------------------------------------------------------------

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

xla::XlaOp RowSums(xla::XlaOp x) {
  xla::XlaBuilder* builder = x.builder();
  const xla::PrimitiveType type = builder->GetShape(x).value().element_type();
  return xla::Reduce(x, xla::Zero(builder, type), xla::CreateScalarAddComputation(type, builder),
                     {1});
}

xla::XlaOp MeanRow(xla::XlaOp x, int64_t rows) {
  xla::XlaBuilder* builder = x.builder();
  const xla::PrimitiveType type = builder->GetShape(x).value().element_type();
  const xla::XlaOp sums =
      xla::Reduce(x, xla::Zero(builder, type), xla::CreateScalarAddComputation(type, builder), {0});
  return sums / xla::ScalarLike(sums, static_cast<double>(rows));
}

xla::XlaOp LessRow(xla::XlaOp x, xla::XlaOp centre) {
  return x - xla::BroadcastInDim(centre, x.builder()->GetShape(x).value().dimensions(), {1});
}

xla::XlaOp PreciseDot(xla::XlaOp a, xla::XlaOp b, int64_t a_contract, int64_t b_contract) {
  xla::DotDimensionNumbers dims;
  dims.add_lhs_contracting_dimensions(a_contract);
  dims.add_rhs_contracting_dimensions(b_contract);
  xla::PrecisionConfig precision;
  precision.add_operand_precision(xla::PrecisionConfig::HIGHEST);
  precision.add_operand_precision(xla::PrecisionConfig::HIGHEST);
  return xla::DotGeneral(a, b, dims, &precision);
}

namespace {

// Read once, when the library loads.
const bool kHloOnCpu = [] {
  const char* value = std::getenv("FUSED_CONTRASTIVE_XLA_CPU_HLO");
  return value != nullptr && std::string(value) == "1";
}();

}  // namespace

bool HloOnCpu() { return kHloOnCpu; }

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

}  // namespace fused_contrastive
