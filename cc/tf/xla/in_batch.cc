// XLA lowerings of the in-batch all-pairs loss. On XLA's CPU backend they are
// host calls of InBatchLossCpu (xla/in_batch_host_calls.cc): the kernel's
// exact path for cancelling pairs and its symmetric sweep (each unordered
// pair of blocks once, half the HLO's products) are out of the HLO's reach,
// and its results do not depend on the thread count, so the calls give the
// OpKernels' bits.
//
// The HLO lowering (the other backends) runs the kernels' sweep as a While
// loop over blocks of R anchor rows, each against all B rows: S = E_blk·Eᵀ
// [R, B], the pair terms of core/in_batch/math.h evaluated on S, and for the
// gradient M [R, B] and M·E. No value has more than R·B elements, so memory
// grows linearly in B.
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
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"
#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/in_batch.h"
#include "tf/xla/hlo.h"
#include "xla/hlo/builder/lib/arithmetic.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::TensorShape;

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
// float32 or float64, is the compute type), anchor range (int64 [2]) and
// margins.
struct InBatchInputs {
  int64_t rows, dim, block;
  xla::PrimitiveType type;
  xla::XlaOp labels, e, anchors, margin, positive_margin;
};

// The shapes checked as the OpKernels check them, the anchor range where it
// is a constant, and the type; the ops unset.
template <typename Io>
absl::Status InBatchShapes(tensorflow::XlaOpKernelContext* ctx, int64_t max_block_rows,
                           InBatchInputs* in) {
  const TensorShape e = ctx->InputShape(Io::kEmbeddings);
  TF_RETURN_IF_ERROR(CheckInBatchShapes(ctx->InputShape(Io::kLabels), e));
  TF_RETURN_IF_ERROR(CheckInBatchAnchors(ctx->InputShape(Io::kAnchors)));
  in->rows = e.dim_size(0);
  in->dim = e.dim_size(1);
  std::vector<int64_t> anchors;
  if (ctx->ConstantInputAsIntVector(Io::kAnchors, &anchors).ok()) {
    InBatchArgs probe;
    probe.rows = in->rows;
    TF_RETURN_IF_ERROR(SetInBatchAnchors(anchors.data(), &probe));
  }
  in->block = InBatchBlockRows(in->rows, max_block_rows);
  in->type = ctx->input_xla_type(Io::kEmbeddings);
  return absl::OkStatus();
}

// The anchors input's values, S64 scalars: [begin, end, grad, used].
xla::XlaOp AnchorsValue(xla::XlaOp anchors, int64_t i) {
  return xla::Reshape(xla::Slice(anchors, {i}, {i + 1}, {1}), {});
}

void AnchorEnds(xla::XlaOp anchors, xla::XlaOp* begin, xla::XlaOp* end) {
  *begin = AnchorsValue(anchors, 0);
  *end = AnchorsValue(anchors, 1);
}

// Whether each row number of `index` (S64) is an anchor's, and a used row's.
xla::XlaOp IsAnchor(xla::XlaOp anchors, xla::XlaOp index) {
  xla::XlaOp begin, end;
  AnchorEnds(anchors, &begin, &end);
  return xla::And(xla::Ge(index, begin), xla::Lt(index, end));
}

xla::XlaOp IsUsed(xla::XlaOp anchors, xla::XlaOp index) {
  return xla::Lt(index, AnchorsValue(anchors, 3));
}

// Whether each row of `index` gets its gradient (a used row before grad).
xla::XlaOp HasGradient(xla::XlaOp anchors, xla::XlaOp index) {
  return xla::Lt(index, AnchorsValue(anchors, 2));
}

// x where `ok`, else NaN: what an anchor range known only at run time gives
// when it is invalid (the lowering cannot raise there; the kernels do).
xla::XlaOp NanUnless(xla::XlaOp ok, xla::XlaOp x, xla::PrimitiveType type) {
  const xla::Shape shape = x.builder()->GetShape(x).value();
  return xla::Select(xla::Broadcast(ok, shape.dimensions()), x,
                     xla::Broadcast(xla::NanValue(x.builder(), type), shape.dimensions()));
}

// Whether the anchors input is valid for `rows` rows (InBatchAnchorsProblem).
xla::XlaOp AnchorsValid(xla::XlaOp anchors, int64_t rows) {
  xla::XlaOp begin, end;
  AnchorEnds(anchors, &begin, &end);
  const xla::XlaOp grad = AnchorsValue(anchors, 2), used = AnchorsValue(anchors, 3);
  const xla::XlaOp ordered =
      xla::And(xla::And(xla::Le(begin, end), xla::Le(end, grad)), xla::Le(grad, used));
  return xla::And(ordered, xla::And(xla::Ge(begin, xla::ScalarLike(begin, 0)),
                                    xla::Le(used, xla::ScalarLike(used, rows))));
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
  // Which pairs (i, j) of the block's rows i (labels y_block, rows from
  // start) and rows j have equal labels, and which have j ≠ i.
  void Masks(xla::XlaOp y_block, xla::XlaOp y, xla::XlaOp start, xla::XlaOp* same,
             xla::XlaOp* other) const {
    *same = xla::Eq(AlongRows(y_block), AlongColumns(y));
    *other = xla::Ne(RowIndex(start), ColumnIndex(y.builder()));
  }
  // The pairs of two used rows among other.
  xla::XlaOp Used(xla::XlaOp other, xla::XlaOp anchors, xla::XlaOp start) const {
    return xla::And(other, xla::And(IsUsed(anchors, RowIndex(start)),
                                    IsUsed(anchors, ColumnIndex(anchors.builder()))));
  }
  // The used pairs with an anchor among other: those of the loss and gradient.
  xla::XlaOp WithAnchor(xla::XlaOp other, xla::XlaOp anchors, xla::XlaOp start) const {
    return xla::And(Used(other, anchors, start),
                    xla::Or(IsAnchor(anchors, RowIndex(start)),
                            IsAnchor(anchors, ColumnIndex(anchors.builder()))));
  }
  xla::XlaOp RowIndex(xla::XlaOp start) const {
    return xla::Iota(start.builder(), xla::ShapeUtil::MakeShape(xla::S64, {block, rows}), 0) +
           start;
  }
  xla::XlaOp ColumnIndex(xla::XlaBuilder* builder) const {
    return xla::Iota(builder, xla::ShapeUtil::MakeShape(xla::S64, {block, rows}), 1);
  }
};

// pair_weights() of every row, in float64 ([B] each), for the used rows'
// count (known at run time); for "balanced" from each row's count of other
// used rows with its label, counted in a first loop over row blocks.
absl::Status InBatchPairWeights(const InBatchInputs& in, PairWeighting weighting,
                                xla::XlaOp* positive_weight, xla::XlaOp* negative_weight) {
  xla::XlaBuilder* builder = in.labels.builder();
  const xla::XlaOp used =
      xla::Broadcast(xla::ConvertElementType(AnchorsValue(in.anchors, 3), xla::F64), {in.rows});
  xla::XlaOp positives = xla::ZerosLike(used);
  if (weighting == PairWeighting::kBalanced) {
    const PairBlock pairs{in.block, in.rows};
    const xla::XlaOp no_counts =
        xla::Zeros(builder, xla::ShapeUtil::MakeShape(xla::S64, {in.rows}));
    TF_ASSIGN_OR_RETURN(
        const std::vector<xla::XlaOp> counted,
        ForEachRowBlock(in.rows, in.block, {in.labels, no_counts, in.anchors}, "in_batch_positives",
                        [&](xla::XlaOp start, std::vector<xla::XlaOp> v,
                            xla::XlaBuilder*) -> absl::StatusOr<std::vector<xla::XlaOp>> {
                          xla::XlaOp same, other;
                          pairs.Masks(RowBlock(v[0], start, in.block), v[0], start, &same, &other);
                          const xla::XlaOp positives = RowSums(xla::ConvertElementType(
                              xla::And(same, pairs.Used(other, v[2], start)), xla::S64));
                          v[1] = SetRowBlock(v[1], positives, start);
                          return v;
                        }));
    positives = xla::ConvertElementType(counted[1], xla::F64);
  }
  const xla::XlaOp none = xla::ZerosLike(used);
  pair_weights(weighting, used, positives, none, none, positive_weight, negative_weight);
  return absl::OkStatus();
}

// q_I·E_I − M·E: the gradient of a block of anchors I (core/in_batch/math.h).
template <Distance K>
xla::XlaOp GradientBlock(xla::XlaOp m, xla::XlaOp s, xla::XlaOp stat_block, xla::XlaOp e_block,
                         xla::XlaOp e) {
  const xla::XlaOp q = diagonal_factor<K>(stat_block) * RowSums(diagonal_term<K>(m, s));
  const xla::Shape shape = e_block.builder()->GetShape(e_block).value();
  return xla::BroadcastInDim(q, shape.dimensions(), {0}) * e_block - PreciseDot(m, e, 1, 0);
}

// The loop of InBatchSweep, with the rows' pair weights (float64 [B] each)
// given. counts: when not null (and no upstream), each row's numbers of
// nonzero positive and negative terms (active_term; float64 [B] each) are
// written there.
template <Distance K>
absl::Status SweepLoop(const InBatchInputs& in, xla::XlaOp positive_weight,
                       xla::XlaOp negative_weight, const xla::XlaOp* upstream, xla::XlaOp* loss,
                       xla::XlaOp* grad, xla::XlaOp* counts) {
  xla::XlaBuilder* builder = in.e.builder();
  const bool with_grad = upstream != nullptr;
  // Partners: weight 0 and no upstream read, as in the kernels (selected, so
  // that a NaN upstream of a partner stays unread).
  const xla::XlaOp is_anchor = IsAnchor(in.anchors, xla::Iota(builder, xla::S64, in.rows));
  const auto anchors_only = [&](xla::XlaOp x) {
    return xla::Select(is_anchor, x, xla::ZerosLike(x));
  };
  positive_weight = anchors_only(positive_weight);
  negative_weight = anchors_only(negative_weight);
  const xla::XlaOp centre = K == Distance::kEuclidean ? MeanRow(in.e, in.rows) : xla::XlaOp();
  // Cosine rows of extreme scale divided by 2^k (cosine_row_exponent), as the
  // kernels divide them, and their gradient rows too (below).
  const xla::XlaOp exponents =
      K == Distance::kCosine ? CosineRowExponents(RowMaxAbs(in.e, in.type), in.type) : xla::XlaOp();
  const xla::XlaOp e = K == Distance::kEuclidean
                           ? LessRow(in.e, centre)
                           : ScaleRowsByPowerOfTwo(in.e, -exponents, in.type, in.rows, in.dim);
  const xla::XlaOp norm2 = RowSums(e * e);
  // The loop's values: inputs first, then what it writes, then the
  // gradient's inputs and output.
  enum {
    kE,
    kLabels,
    kAnchors,
    kStat,
    kPositiveWeight,
    kNegativeWeight,
    kMargin,
    kPositiveMargin,
    kLoss,
    kPositiveCoefficient,
    kNegativeCoefficient,
    kGrad
  };
  std::vector<xla::XlaOp> values = {
      e,
      in.labels,
      in.anchors,
      row_statistic<K>(norm2),
      positive_weight,
      negative_weight,
      in.margin,
      in.positive_margin,
      xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {in.rows}))};
  if (with_grad) {
    const xla::XlaOp g = anchors_only(xla::ConvertElementType(*upstream, xla::F64));
    values.push_back(xla::ConvertElementType(positive_weight * g, in.type));
    values.push_back(xla::ConvertElementType(negative_weight * g, in.type));
    values.push_back(xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim})));
  }
  const int counted = static_cast<int>(values.size());
  if (counts != nullptr) {
    const xla::XlaOp zeros = xla::Zeros(builder, xla::ShapeUtil::MakeShape(xla::F64, {in.rows}));
    values.insert(values.end(), {zeros, zeros});
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
    other = pairs.WithAnchor(other, v[kAnchors], start);
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
      const xla::XlaOp cancels =
          xla::Le(euclidean_squared(s, stat_i, stat_j),
                  xla::ScalarLike(sums, GramCancellation<float>::value) * sums);
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
          d,
          Choose(
              wide,
              BranchOf{"in_float64", {block_of(raw), v[raw], v[raw + 1]}, xla::F64, gram_distances},
              BranchOf{"as_is", {d}, in.type, as_is}, in.type));
    }
    xla::XlaOp positive_t, positive_slope, negative_t, negative_slope;
    positive_term(d, v[kPositiveMargin], &positive_t, &positive_slope);
    negative_term(d, v[kMargin], &negative_t, &negative_slope);
    const auto f64 = [](xla::XlaOp x) { return xla::ConvertElementType(x, xla::F64); };
    // A partner's sums hold its pairs with anchors: not a loss.
    const xla::XlaOp block_anchors = IsAnchor(
        v[kAnchors],
        xla::Iota(start.builder(), xla::ShapeUtil::MakeShape(xla::S64, {in.block}), 0) + start);
    xla::XlaOp loss_block = xla::ConvertElementType(
        block_of(kPositiveWeight) * f64(RowSums(masked(positive, positive_t))) +
            block_of(kNegativeWeight) * f64(RowSums(masked(negative, negative_t))),
        in.type);
    loss_block = xla::Select(block_anchors, loss_block, xla::ZerosLike(loss_block));
    v[kLoss] = SetRowBlock(v[kLoss], loss_block, start);
    if (counts != nullptr) {
      v[counted] =
          SetRowBlock(v[counted], f64(RowSums(masked(positive, active_term(positive_t)))), start);
      v[counted + 1] = SetRowBlock(v[counted + 1],
                                   f64(RowSums(masked(negative, active_term(negative_t)))), start);
    }
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
      TF_ASSIGN_OR_RETURN(grad_block,
                          Choose(wide,
                                 BranchOf{"in_float64",
                                          {m, s, stat_block, block_of(raw), v[raw], v[raw + 1]},
                                          xla::F64,
                                          gradient},
                                 BranchOf{"as_is", narrow, in.type, gradient}, in.type));
    } else {
      grad_block = gradient(narrow);
    }
    v[kGrad] = SetRowBlock(v[kGrad], grad_block, start);
    return v;
  };
  TF_ASSIGN_OR_RETURN(const std::vector<xla::XlaOp> out,
                      ForEachRowBlock(in.rows, in.block, values, "in_batch_sweep", body));
  const xla::XlaOp valid = AnchorsValid(in.anchors, in.rows);
  *loss = NanUnless(valid, out[kLoss], in.type);
  if (counts != nullptr) {
    counts[0] = out[counted];
    counts[1] = out[counted + 1];
  }
  if (!with_grad) return absl::OkStatus();
  xla::XlaOp g = K == Distance::kCosine
                     ? ScaleRowsByPowerOfTwo(out[kGrad], -exponents, in.type, in.rows, in.dim)
                     : out[kGrad];
  // An unused row's gradient, and one past grad, is 0, as the kernels write
  // it (not 0·e_i).
  const xla::XlaOp has_gradient = xla::BroadcastInDim(
      HasGradient(in.anchors, xla::Iota(builder, xla::S64, in.rows)), {in.rows, in.dim}, {0});
  *grad = NanUnless(valid, xla::Select(has_gradient, g, xla::ZerosLike(g)), in.type);
  return absl::OkStatus();
}

// The sweep: each anchor's loss [B] and, when `upstream` ([B], the
// embeddings' type) is given, the gradient of Σ upstream_i·loss_i [B, D],
// grouped as the CPU kernel groups them (core/in_batch/cpu_sweep.h): weights
// in float64, the pair coefficients' halves g_i·w_i in the compute type.
// "active" weights come from a first, counting loop, as the kernels' first
// sweep.
template <Distance K>
absl::Status InBatchSweep(const InBatchInputs& in, PairWeighting weighting,
                          const xla::XlaOp* upstream, xla::XlaOp* loss, xla::XlaOp* grad) {
  xla::XlaBuilder* builder = in.e.builder();
  if (in.rows == 0) {
    *loss = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0}));
    if (upstream != nullptr) {
      *grad = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0, in.dim}));
    }
    return absl::OkStatus();
  }
  xla::XlaOp positive_weight, negative_weight;
  if (weighting == PairWeighting::kActive) {
    const xla::XlaOp ones = xla::Broadcast(xla::ConstantR0<double>(builder, 1.0), {in.rows});
    xla::XlaOp counts[2], unused;
    TF_RETURN_IF_ERROR(SweepLoop<K>(in, ones, ones, nullptr, &unused, nullptr, counts));
    const xla::XlaOp none = xla::ZerosLike(ones);
    pair_weights(weighting, none, none, counts[0], counts[1], &positive_weight, &negative_weight);
  } else {
    TF_RETURN_IF_ERROR(InBatchPairWeights(in, weighting, &positive_weight, &negative_weight));
  }
  return SweepLoop<K>(in, positive_weight, negative_weight, upstream, loss, grad, nullptr);
}

// --- The HLO lowerings ----------------------------------------------------------------

// The attrs all three in-batch lowerings read, and the dispatch on the
// distance.
class InBatchXlaOpBase : public tensorflow::XlaOpKernel {
 public:
  explicit InBatchXlaOpBase(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadInBatchAttrs(ctx, &attrs_));
  }

 protected:
  // f(DistanceTag<K>{}) for the op's distance and dtype, which the op
  // definitions restrict to what the kernels support.
  template <typename F>
  void Dispatch(tensorflow::XlaOpKernelContext* ctx, F&& f) {
    DType type;
    const bool supported = FromTf(ctx->input_type(InBatchLossIo::kEmbeddings), &type) &&
                           VisitInBatchKernel(type, attrs_.distance, [&](auto, auto k) { f(k); });
    OP_REQUIRES(ctx, supported,
                absl::InternalError("in-batch contrastive loss: unsupported dtype or distance"));
  }

  // Labels, embeddings and margins at the positions of Io.
  template <typename Io>
  absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, InBatchInputs* in) const {
    TF_RETURN_IF_ERROR(MinerNotHere(attrs_.miner, "the HLO lowering (XLA on GPU)"));
    TF_RETURN_IF_ERROR(InBatchShapes<Io>(ctx, attrs_.max_block_rows, in));
    in->labels = ctx->Input(Io::kLabels);
    in->e = ctx->Input(Io::kEmbeddings);
    in->anchors = ctx->Input(Io::kAnchors);
    TF_RETURN_IF_ERROR(ReadMargin(ctx, Io::kMargin, in->type, &in->margin));
    return ReadMargin(ctx, Io::kPositiveMargin, in->type, &in->positive_margin, "positive_margin");
  }

  // For the host lowerings below: the checks of ReadInputs, the call's
  // operands (the op's inputs, in order) and the attrs every handler reads,
  // which XLA passes as int32 (miner_epsilon: its float bits).
  template <typename Io>
  absl::Status HostOperands(tensorflow::XlaOpKernelContext* ctx, InBatchInputs* in,
                            std::vector<xla::XlaOp>* operands,
                            std::vector<std::pair<const char*, int>>* attrs) const {
    if (attrs_.max_block_rows > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "in-batch contrastive loss: max_block_rows must be at most ",
          std::numeric_limits<int32_t>::max(), " under XLA, got ", attrs_.max_block_rows));
    }
    TF_RETURN_IF_ERROR(InBatchShapes<Io>(ctx, attrs_.max_block_rows, in));
    bool constant;
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, Io::kMargin, &constant));
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, Io::kPositiveMargin, &constant, "positive_margin"));
    operands->clear();
    for (int i = 0; i < ctx->num_inputs(); ++i) operands->push_back(ctx->Input(i));
    *attrs = {{"distance", static_cast<int>(attrs_.distance)},
              {"pair_weighting", static_cast<int>(attrs_.weighting)},
              {"max_block_rows", static_cast<int>(attrs_.max_block_rows)},
              {"miner", static_cast<int>(attrs_.miner)},
              {"miner_epsilon_bits", absl::bit_cast<int32_t>(attrs_.miner_epsilon)}};
    return absl::OkStatus();
  }

  InBatchAttrs attrs_;
};

class InBatchLossXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchLossIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      xla::XlaOp loss;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, nullptr, &loss, nullptr));
      ctx->SetOutput(Io::kLoss, loss);
    });
  }
};

class InBatchGradXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchGradIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      OP_REQUIRES_OK(
          ctx, CheckInBatchUpstream(ctx->InputShape(Io::kLabels), ctx->InputShape(Io::kUpstream)));
      const xla::XlaOp upstream = ctx->Input(Io::kUpstream);
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, &upstream, &loss, &grad));
      ctx->SetOutput(Io::kGrad, grad);
      ctx->SetOutput(Io::kLoss, loss);
    });
  }
};

// The reduced op: each anchor's upstream gradient g_i = weight_i ·
// reduction_scale, as InBatchLossReducedCpu sets it, and the loss reduced as
// the reduced embedding op reduces its rows.
class InBatchLossReducedXlaOp : public InBatchXlaOpBase {
 public:
  explicit InBatchLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx) : InBatchXlaOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchReducedIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      const TensorShape weight_shape = ctx->InputShape(Io::kWeights);
      OP_REQUIRES_OK(ctx, CheckInBatchWeights(weight_shape, -1, in.rows));
      const bool scalar_weight = weight_shape.dims() == 0;
      // One weight per anchor, or one for all: g_i of the rows, 0 for partners.
      const int64_t weights = scalar_weight ? in.rows : weight_shape.dim_size(0);
      xla::XlaOp begin, end;
      AnchorEnds(in.anchors, &begin, &end);
      const xla::XlaOp w = ctx->Input(Io::kWeights);
      const xla::XlaOp scale =
          ReductionScale(ctx, reduction_, w, scalar_weight, weights, Io::kLossScale,
                         xla::ConvertElementType(end - begin, xla::F64));
      xla::XlaOp upstream =
          xla::ConvertElementType(xla::ConvertElementType(w, xla::F64) * scale, in.type);
      upstream =
          scalar_weight
              ? xla::Broadcast(upstream, {in.rows})
              : xla::DynamicUpdateSlice(
                    xla::Zeros(ctx->builder(), xla::ShapeUtil::MakeShape(in.type, {in.rows})),
                    upstream, {begin});
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, &upstream, &loss, &grad));
      const xla::XlaOp weighted =
          scalar_weight
              ? xla::Select(IsAnchor(in.anchors, xla::Iota(ctx->builder(), xla::S64, in.rows)),
                            loss * w, xla::ZerosLike(loss))
              : xla::DynamicSlice(loss, {begin}, {weights}) * w;
      // A weight per anchor must match the anchor count, known at run time.
      xla::XlaOp valid = AnchorsValid(in.anchors, in.rows);
      if (!scalar_weight) {
        valid = xla::And(valid, xla::Eq(end - begin, xla::ScalarLike(begin, weights)));
      }
      ctx->SetOutput(Io::kLoss, NanUnless(valid,
                                          ReducedLoss(BlockedSum(weighted, weights, in.type), scale,
                                                      in.type, in.type),
                                          in.type));
      ctx->SetOutput(Io::kGrad, NanUnless(valid, grad, in.type));
      ctx->SetOutput(Io::kReductionScale, scale);
    });
  }

 protected:
  // The host lowering below reads it too.
  Reduction reduction_;
};

// --- The host lowerings (XLA's CPU backend) -------------------------------------------

class InBatchLossHostXlaOp : public InBatchLossXlaOp {
 public:
  using InBatchLossXlaOp::InBatchLossXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchLossIo;
    if (HloOnCpu()) return InBatchLossXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    ctx->SetOutput(Io::kLoss,
                   HostCall(ctx, kInBatchTarget, operands,
                            {xla::ShapeUtil::MakeShape(in.type, {in.rows})}, attrs)[Io::kLoss]);
  }
};

class InBatchGradHostXlaOp : public InBatchGradXlaOp {
 public:
  using InBatchGradXlaOp::InBatchGradXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchGradIo;
    if (HloOnCpu()) return InBatchGradXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(
        ctx, CheckInBatchUpstream(ctx->InputShape(Io::kLabels), ctx->InputShape(Io::kUpstream)));
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kInBatchGradTarget, operands,
                 {xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim}),
                  xla::ShapeUtil::MakeShape(in.type, {in.rows})},
                 attrs);
    for (int i : {Io::kGrad, Io::kLoss}) ctx->SetOutput(i, out[i]);
  }
};

class InBatchLossReducedHostXlaOp : public InBatchLossReducedXlaOp {
 public:
  using InBatchLossReducedXlaOp::InBatchLossReducedXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchReducedIo;
    if (HloOnCpu()) return InBatchLossReducedXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    OP_REQUIRES_OK(ctx, CheckInBatchWeights(ctx->InputShape(Io::kWeights), -1, in.rows));
    attrs.emplace_back("reduction", static_cast<int>(reduction_));
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kInBatchReducedTarget, operands,
                 {xla::ShapeUtil::MakeShape(in.type, {}),
                  xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim}),
                  xla::ShapeUtil::MakeShape(xla::F64, {})},
                 attrs);
    for (int i : {Io::kLoss, Io::kGrad, Io::kReductionScale}) ctx->SetOutput(i, out[i]);
  }
};

}  // namespace

constexpr XlaKernels kInBatchLossXla = {{"InBatchLossXlaOp", Create<InBatchLossXlaOp>},
                                        {"InBatchLossHostXlaOp", Create<InBatchLossHostXlaOp>}};
constexpr XlaKernels kInBatchGradXla = {{"InBatchGradXlaOp", Create<InBatchGradXlaOp>},
                                        {"InBatchGradHostXlaOp", Create<InBatchGradHostXlaOp>}};
constexpr XlaKernels kInBatchReducedXla = {
    {"InBatchLossReducedXlaOp", Create<InBatchLossReducedXlaOp>},
    {"InBatchLossReducedHostXlaOp", Create<InBatchLossReducedHostXlaOp>}};

}  // namespace fused_contrastive
