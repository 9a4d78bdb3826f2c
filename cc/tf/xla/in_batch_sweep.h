// The HLO lowering's sweep of the in-batch all-pairs loss (xla/in_batch.cc),
// and the miners' statistics it finds first. Included by xla/in_batch.cc only.
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
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"
#include "tf/xla/hlo.h"
#include "xla/hlo/builder/lib/arithmetic.h"

namespace fused_contrastive {
namespace {

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

// The miner (core/in_batch/math.h) and each row's hardest pairs (the
// kernels' MinerStats, [B] each), which the counting loop finds and the
// loss loop reads: the distances in the compute type (−inf or +inf for
// none, NaN when one is NaN) and, for batch_hard, the rows (S64, −1: none).
// An anchor sees every other used row in one iteration, so its statistics
// and its kept pairs' counts come from one loop (the kernels' symmetric
// tiles need a sweep for each).
struct Mining {
  Miner miner = Miner::kNone;
  float epsilon = 0;
  bool count_active = false;  // counts for "active" (counted_pair)
  xla::XlaOp positive_d, negative_d, positive_row, negative_row;
};

// Each block row's hardest pair among `mask` (PRED [R, B]) of d [R, B]: the
// largest d (positive) or the smallest, NaN when one is NaN, as
// harder_pair (math.h) orders them; with `row`, the column of the lowest of
// ties (−1: none).
void HardestPairs(const PairBlock& pairs, bool positive, xla::XlaOp mask, xla::XlaOp d,
                  xla::PrimitiveType type, xla::XlaOp* value, xla::XlaOp* row) {
  xla::XlaBuilder* builder = d.builder();
  const std::vector<int64_t> dims = {pairs.block, pairs.rows};
  const xla::XlaOp none = positive ? xla::MinValue(builder, type) : xla::MaxValue(builder, type);
  const xla::XlaOp is_nan = xla::Ne(d, d);
  const xla::XlaOp extreme = xla::Reduce(xla::Select(mask, d, xla::Broadcast(none, dims)), none,
                                         positive ? xla::CreateScalarMaxComputation(type, builder)
                                                  : xla::CreateScalarMinComputation(type, builder),
                                         {1});
  // Explicitly, whatever a backend's max does with NaN.
  const xla::XlaOp nan = xla::Reduce(xla::And(mask, is_nan), xla::ConstantR0<bool>(builder, false),
                                     xla::CreateScalarOrComputation(xla::PRED, builder), {1});
  *value = xla::Select(nan, xla::Broadcast(xla::NanValue(builder, type), {pairs.block}), extreme);
  if (row == nullptr) return;
  const xla::XlaOp hit = xla::And(
      mask, xla::Select(pairs.AlongRows(nan), is_nan, xla::Eq(d, pairs.AlongRows(extreme))));
  const xla::XlaOp past = xla::ConstantR0<int64_t>(builder, pairs.rows);
  const xla::XlaOp first =
      xla::Reduce(xla::Select(hit, pairs.ColumnIndex(builder), xla::Broadcast(past, dims)), past,
                  xla::CreateScalarMinComputation(xla::S64, builder), {1});
  *row = xla::Select(xla::Eq(first, past),
                     xla::Broadcast(xla::ConstantR0<int64_t>(builder, -1), {pairs.block}), first);
}

// The pair masks (1 or 0, [R, B]) times the miner's choice of an anchor a
// for its partner p: `hardest(side)` gives a's statistics along the block
// (0 positive_d, 1 negative_d, 2 positive_row, 3 negative_row), `partner`
// p's row number. batch_hard keeps the hardest pairs' rows, multi_similarity
// by distance (multi_similarity_keeps).
template <typename Hardest>
void KeepMasks(const Mining& mining, xla::XlaOp d, const Hardest& hardest, xla::XlaOp partner,
               xla::XlaOp* positive, xla::XlaOp* negative) {
  if (mining.miner == Miner::kBatchHard) {
    const auto is = [&](xla::XlaOp row) {
      return xla::Select(xla::Eq(partner, row), xla::FullLike(d, 1), xla::ZerosLike(d));
    };
    *positive = *positive * is(hardest(2));
    *negative = *negative * is(hardest(3));
  } else {
    const xla::XlaOp epsilon = xla::ScalarLike(d, mining.epsilon);
    *positive = *positive * multi_similarity_keeps(true, d, hardest(1), epsilon);
    *negative = *negative * multi_similarity_keeps(false, d, hardest(0), epsilon);
  }
}

// The loop of InBatchSweep, with the rows' pair weights (float64 [B] each)
// given, and the rows' hardest pairs where there is a miner. counts: when
// not null (and no upstream), the loop counts instead: each row's hardest
// pairs go to *mining, and its kept pairs' counted_pair sums (float64 [B]
// each) to counts.
template <Distance K>
absl::Status SweepLoop(const InBatchInputs& in, Mining* mining, xla::XlaOp positive_weight,
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
  // The rows' hardest pairs (Mining's order), written by the counting loop.
  const bool mined = mining->miner != Miner::kNone;
  const int hardest = static_cast<int>(values.size());
  if (mined && counts != nullptr) {
    const xla::XlaOp zeros = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {in.rows}));
    const xla::XlaOp rows = xla::Zeros(builder, xla::ShapeUtil::MakeShape(xla::S64, {in.rows}));
    values.insert(values.end(), {zeros, zeros, rows, rows});
  } else if (mined) {
    values.insert(values.end(), {mining->positive_d, mining->negative_d, mining->positive_row,
                                 mining->negative_row});
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
    const xla::XlaOp positive_pairs = xla::And(same, other);
    const xla::XlaOp negative_pairs = xla::And(xla::Not(same), other);
    // 1 or 0 per pair, as the kernel's masks.
    const xla::XlaOp positive = xla::ConvertElementType(positive_pairs, in.type);
    const xla::XlaOp negative = xla::ConvertElementType(negative_pairs, in.type);
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
    // The kept pairs: row i's as an anchor (kp, kn), column j's (kcp, kcn);
    // without a miner every pair.
    xla::XlaOp kp = positive, kn = negative, kcp = positive, kcn = negative;
    if (mined) {
      xla::XlaOp row_hardest[4];
      if (counts != nullptr) {
        const bool rows = mining->miner == Miner::kBatchHard;
        HardestPairs(pairs, true, positive_pairs, d, in.type, &row_hardest[0],
                     rows ? &row_hardest[2] : nullptr);
        HardestPairs(pairs, false, negative_pairs, d, in.type, &row_hardest[1],
                     rows ? &row_hardest[3] : nullptr);
        for (int k = 0; k < 4; ++k) {
          if (rows || k < 2) v[hardest + k] = SetRowBlock(v[hardest + k], row_hardest[k], start);
        }
      } else {
        for (int k = 0; k < 4; ++k) row_hardest[k] = block_of(hardest + k);
      }
      KeepMasks(
          *mining, d, [&](int k) { return pairs.AlongRows(row_hardest[k]); },
          pairs.ColumnIndex(start.builder()), &kp, &kn);
      KeepMasks(
          *mining, d, [&](int k) { return pairs.AlongColumns(v[hardest + k]); },
          pairs.RowIndex(start), &kcp, &kcn);
    }
    if (counts != nullptr) {
      const xla::XlaOp active = xla::ScalarLike(d, mining->count_active ? 1 : 0);
      const auto count = [&](xla::XlaOp keep, xla::XlaOp term) {
        return f64(RowSums(counted_pair(active, keep, masked(keep, term))));
      };
      v[counted] = SetRowBlock(v[counted], count(kp, positive_t), start);
      v[counted + 1] = SetRowBlock(v[counted + 1], count(kn, negative_t), start);
      return v;
    }
    // A partner's sums hold its pairs with anchors: not a loss.
    const xla::XlaOp block_anchors = IsAnchor(
        v[kAnchors],
        xla::Iota(start.builder(), xla::ShapeUtil::MakeShape(xla::S64, {in.block}), 0) + start);
    xla::XlaOp loss_block = xla::ConvertElementType(
        block_of(kPositiveWeight) * f64(RowSums(masked(kp, positive_t))) +
            block_of(kNegativeWeight) * f64(RowSums(masked(kn, negative_t))),
        in.type);
    loss_block = xla::Select(block_anchors, loss_block, xla::ZerosLike(loss_block));
    v[kLoss] = SetRowBlock(v[kLoss], loss_block, start);
    if (!with_grad) return v;
    // g_i·w_i + g_j·w_j of the pairs each order keeps (as the kernels' sums;
    // without a miner 1·x, left out).
    const auto pair_sum = [&](int value, xla::XlaOp keep, xla::XlaOp column_keep) {
      const xla::XlaOp row = pairs.AlongRows(block_of(value));
      const xla::XlaOp column = pairs.AlongColumns(v[value]);
      return mined ? keep * row + column_keep * column : row + column;
    };
    const xla::XlaOp coefficient =
        masked(mined ? kp + kcp : kp, pair_sum(kPositiveCoefficient, kp, kcp) * positive_slope) +
        masked(mined ? kn + kcn : kn, pair_sum(kNegativeCoefficient, kn, kcn) * negative_slope);
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
    if (mined) {
      mining->positive_d = out[hardest];
      mining->negative_d = out[hardest + 1];
      mining->positive_row = out[hardest + 2];
      mining->negative_row = out[hardest + 3];
    }
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
// "active" weights, and a miner's, come from a first, counting loop, as the
// kernels' first sweeps.
template <Distance K>
absl::Status InBatchSweep(const InBatchInputs& in, PairWeighting weighting, Miner miner,
                          float miner_epsilon, const xla::XlaOp* upstream, xla::XlaOp* loss,
                          xla::XlaOp* grad) {
  xla::XlaBuilder* builder = in.e.builder();
  if (in.rows == 0) {
    *loss = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0}));
    if (upstream != nullptr) {
      *grad = xla::Zeros(builder, xla::ShapeUtil::MakeShape(in.type, {0, in.dim}));
    }
    return absl::OkStatus();
  }
  Mining mining{miner, miner_epsilon, weighting == PairWeighting::kActive};
  xla::XlaOp positive_weight, negative_weight;
  if (mining.count_active || miner != Miner::kNone) {
    const xla::XlaOp ones = xla::Broadcast(xla::ConstantR0<double>(builder, 1.0), {in.rows});
    xla::XlaOp counts[2], unused;
    TF_RETURN_IF_ERROR(SweepLoop<K>(in, &mining, ones, ones, nullptr, &unused, nullptr, counts));
    mined_pair_weights(weighting, counts[0], counts[1], &positive_weight, &negative_weight);
  } else {
    TF_RETURN_IF_ERROR(InBatchPairWeights(in, weighting, &positive_weight, &negative_weight));
  }
  return SweepLoop<K>(in, &mining, positive_weight, negative_weight, upstream, loss, grad, nullptr);
}

}  // namespace
}  // namespace fused_contrastive
