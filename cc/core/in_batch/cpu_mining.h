// The miners' per-anchor statistics in the CPU in-batch kernel (cpu_sweep.h):
// a statistics sweep finds each anchor's hardest positive and hardest
// negative before the sweeps that keep or drop its pairs. In the namespace of
// the instruction set the including file is built for. Not a public header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/in_batch/cpu_blocks.h"
#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"

namespace fused_contrastive {
namespace FC_IN_BATCH_ISA {
namespace {

// Each anchor's hardest positive (largest d) and hardest negative (smallest
// d), with the partner's row, in harder_pair's order (NaN first, ties to the
// lowest row), whatever order the tiles offer them in. Row −1: no
// such partner (d then −inf for positives, +inf for negatives, which keeps
// nothing in multi_similarity_keeps).
template <typename T>
struct MinerStats {
  std::vector<T> positive_d, negative_d;
  std::vector<int32_t> positive_row, negative_row;

  explicit MinerStats(int64_t rows = 0)
      : positive_d(rows, -std::numeric_limits<T>::infinity()),
        negative_d(rows, std::numeric_limits<T>::infinity()),
        positive_row(rows, -1),
        negative_row(rows, -1) {}

  // Partner j at distance d, for anchor i's positive or negative side.
  void Offer(bool positive, int64_t i, T d, int64_t j) {
    T& best = positive ? positive_d[i] : negative_d[i];
    int32_t& row = positive ? positive_row[i] : negative_row[i];
    if (harder_pair(positive, d, j, best, int64_t{row})) {
      best = d;
      row = static_cast<int32_t>(j);
    }
  }
};

// Offers row i's hardest pairs within a tile: d[c] the distance to row j0 + c
// (c != self), class ids to compare labels. A vectorised pass finds the
// extreme values, a scalar one the first column holding them, unless only
// the values are wanted (values_only: multi_similarity reads no rows).
template <typename T>
void OfferRow(const T* d, int32_t class_i, const int32_t* class_j, int64_t self, int64_t i,
              int64_t j0, int64_t nj, bool values_only, MinerStats<T>* stats) {
  const T inf = std::numeric_limits<T>::infinity();
  T largest = -inf, smallest = inf, nan_positive = 0, nan_negative = 0;
  // Masks as values, not bools, as in the sweep's tile loop (GCC 12 leaves a
  // loop that combines bools of different widths scalar); std::max and
  // std::min keep their first operand against a NaN.
#pragma omp simd reduction(max : largest) reduction(min : smallest) \
    reduction(+ : nan_positive, nan_negative)
  for (int64_t c = 0; c < nj; ++c) {
    const T valid = c == self ? T(0) : T(1);
    const T positive = class_j[c] == class_i ? valid : T(0);
    const T negative = valid - positive;
    const T x = d[c];
    const T nan = x != x ? T(1) : T(0);
    largest = std::max(largest, positive != T(0) ? x : -inf);
    smallest = std::min(smallest, negative != T(0) ? x : inf);
    nan_positive += nan * positive;
    nan_negative += nan * negative;
  }
  for (int side = 0; side < 2; ++side) {
    const bool want_positive = side == 0;
    const bool nan = (want_positive ? nan_positive : nan_negative) != T(0);
    const T target = want_positive ? largest : smallest;
    // No column of this tile can beat the anchor's hardest so far (most
    // tiles, once the sweep is under way): skip the scalar search.
    const T best = want_positive ? stats->positive_d[i] : stats->negative_d[i];
    const int32_t best_row = want_positive ? stats->positive_row[i] : stats->negative_row[i];
    const T candidate = nan ? std::numeric_limits<T>::quiet_NaN() : target;
    if (values_only) {
      stats->Offer(want_positive, i, candidate, j0);
      continue;
    }
    if (!harder_pair(want_positive, candidate, j0, best, int64_t{best_row})) {
      continue;
    }
    for (int64_t c = 0; c < nj; ++c) {
      if (c == self || (class_j[c] == class_i) != want_positive) continue;
      if (nan ? std::isnan(d[c]) : d[c] == target) {
        stats->Offer(want_positive, i, d[c], j0 + c);
        break;
      }
    }
  }
}

// Offers each column's hardest pairs within a tile of two blocks (the pairs'
// other order): tile[r·nj + c] the distance of rows i0 + r and j0 + c,
// class ids to compare labels. Rows in increasing order with strict
// comparisons, so a tie keeps the lowest row.
template <typename T>
void OfferColumns(const T* tile, const int32_t* class_i, const int32_t* class_j, int64_t i0,
                  int64_t ni, int64_t j0, int64_t nj, MinerStats<T>* stats) {
  thread_local std::vector<T> best;
  thread_local std::vector<int32_t> row;
  best.resize(2 * nj);
  row.assign(4 * nj, -1);
  T* largest = best.data();
  T* smallest = best.data() + nj;
  int32_t* largest_row = row.data();
  int32_t* smallest_row = row.data() + nj;
  int32_t* nan_positive_row = row.data() + 2 * nj;
  int32_t* nan_negative_row = row.data() + 3 * nj;
  std::fill_n(largest, nj, -std::numeric_limits<T>::infinity());
  std::fill_n(smallest, nj, std::numeric_limits<T>::infinity());
  for (int64_t r = 0; r < ni; ++r) {
    const T* d = tile + r * nj;
    const int32_t ci = class_i[r], i = static_cast<int32_t>(i0 + r);
    // Masks as values, every operand read (no && or ||): as in OfferRow.
#pragma omp simd
    for (int64_t c = 0; c < nj; ++c) {
      const T positive = class_j[c] == ci ? T(1) : T(0);
      const T x = d[c];
      const T number = x == x ? T(1) : T(0);
      const T positive_first = largest_row[c] < 0 ? T(1) : T(0);
      const T negative_first = smallest_row[c] < 0 ? T(1) : T(0);
      const T larger = std::max(positive_first, x > largest[c] ? T(1) : T(0));
      const T smaller = std::max(negative_first, x < smallest[c] ? T(1) : T(0));
      const T take_positive = positive * number * larger;
      const T take_negative = (T(1) - positive) * number * smaller;
      largest[c] = take_positive != T(0) ? x : largest[c];
      largest_row[c] = take_positive != T(0) ? i : largest_row[c];
      smallest[c] = take_negative != T(0) ? x : smallest[c];
      smallest_row[c] = take_negative != T(0) ? i : smallest_row[c];
      const T first_nan_positive = nan_positive_row[c] < 0 ? T(1) : T(0);
      const T first_nan_negative = nan_negative_row[c] < 0 ? T(1) : T(0);
      const T nan = T(1) - number;
      nan_positive_row[c] = positive * nan * first_nan_positive != T(0) ? i : nan_positive_row[c];
      nan_negative_row[c] =
          (T(1) - positive) * nan * first_nan_negative != T(0) ? i : nan_negative_row[c];
    }
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t c = 0; c < nj; ++c) {
    if (nan_positive_row[c] >= 0) {
      stats->Offer(true, j0 + c, nan, nan_positive_row[c]);
    } else if (largest_row[c] >= 0) {
      stats->Offer(true, j0 + c, largest[c], largest_row[c]);
    }
    if (nan_negative_row[c] >= 0) {
      stats->Offer(false, j0 + c, nan, nan_negative_row[c]);
    } else if (smallest_row[c] >= 0) {
      stats->Offer(false, j0 + c, smallest[c], smallest_row[c]);
    }
  }
}

// The rows as the sweeps use them: e (cosine: rows of extreme scale divided
// by 2^k, k in exponent, empty when none is) and each row's statistic.
template <typename T>
struct PreparedRows {
  const T* e;
  int64_t dim;
  const T* stat;
  const std::vector<int>& exponent;
};

// batch_hard needs no sweep after the statistics: each anchor keeps at most
// two pairs, whose terms and gradients come here, O(B·D), anchor by anchor
// (deterministic). The Euclidean distance from e_i − e_j (as the sweeps'
// exact path), the cosine one from the rows' product and statistics; a row
// of `used` rows' loss and gradient (args' anchors; 0 for partners, no
// gradient from grad_rows on).
template <typename T, Distance K>
void BatchHardLoss(const InBatchArgs& args, const PreparedRows<T>& rows,
                   const MinerStats<T>& stats) {
  const int64_t dim = rows.dim;
  T* loss = static_cast<T*>(args.loss);
  T* grad = static_cast<T*>(args.grad);
  const T* upstream = static_cast<const T*>(args.upstream);
  if (loss != nullptr) std::fill_n(loss, args.rows, T(0));
  if (grad != nullptr) std::fill_n(grad, args.rows * dim, T(0));
  const bool scaled = !rows.exponent.empty();
  const T margins[2] = {static_cast<T>(args.positive_margin), static_cast<T>(args.margin)};
  for (int64_t i = args.anchor_begin; i < args.anchor_end; ++i) {
    const int64_t partner[2] = {stats.positive_row[i], stats.negative_row[i]};
    T d[2] = {0, 0}, s[2] = {0, 0}, term[2] = {0, 0}, slope[2] = {0, 0}, counted[2] = {0, 0};
    const T* ei = rows.e + i * dim;
    for (int side = 0; side < 2; ++side) {
      if (partner[side] < 0) continue;
      const T* ej = rows.e + partner[side] * dim;
      if constexpr (K == Distance::kEuclidean) {
        d[side] = ElementOps<T>::sqrt(SquaredDistance(ei, ej, dim));
      } else {
        s[side] = Dot(ei, ej, dim);
        d[side] = pair_distance<K>(s[side], rows.stat[i], rows.stat[partner[side]]);
      }
      if (side == 0) {
        positive_term(d[side], margins[0], &term[side], &slope[side]);
      } else {
        negative_term(d[side], margins[1], &term[side], &slope[side]);
      }
      counted[side] =
          counted_pair(args.weighting == PairWeighting::kActive ? T(1) : T(0), T(1), term[side]);
    }
    double weight[2];
    mined_pair_weights(args.weighting, static_cast<double>(counted[0]),
                       static_cast<double>(counted[1]), &weight[0], &weight[1]);
    if (loss != nullptr) loss[i] = static_cast<T>(weight[0] * term[0] + weight[1] * term[1]);
    if (grad == nullptr) continue;
    for (int side = 0; side < 2; ++side) {
      const int64_t j = partner[side];
      if (j < 0) continue;
      // d(objective)/d(d) of the pair, then its gradient as the sweeps form
      // it (math.h): q·e_i − M·e_j to row i, and the same with i and j
      // swapped to row j.
      const T c = static_cast<T>(weight[side] * upstream[i]) * slope[side];
      const T* ej = rows.e + j * dim;
      T* gi = grad + i * dim;
      T* gj = grad + j * dim;
      const bool to_j = j < args.grad_rows;
      const T si = rows.stat[i], sj = rows.stat[j];
      const T m = gram_coefficient<K>(c, d[side], si, sj);
      const T q = diagonal_term<K>(m, s[side]);
      const T qi = diagonal_factor<K>(si) * q, qj = diagonal_factor<K>(sj) * q;
      for (int64_t k = 0; k < dim; ++k) {
        const T di = qi * ei[k] - m * ej[k];
        const T dj = qj * ej[k] - m * ei[k];
        gi[k] += scaled ? std::ldexp(di, -rows.exponent[i]) : di;
        if (to_j) gj[k] += scaled ? std::ldexp(dj, -rows.exponent[j]) : dj;
      }
    }
  }
}

// A MinerStats' arrays as raw pointers, for the tile loops: read through a
// std::vector, the pointers are reloaded per lane (the stores to the tile's
// sums might alias them) and GCC 12 leaves the loop scalar.
template <typename T>
struct MinerView {
  const T *positive_d, *negative_d;
  T epsilon;
};

template <typename T>
MinerView<T> ViewOf(const MinerStats<T>* stats, T epsilon) {
  if (stats == nullptr || stats->positive_d.empty()) return {nullptr, nullptr, 0};
  return {stats->positive_d.data(), stats->negative_d.data(), epsilon};
}

// A running extreme after offering x, a pair of the side wanted when mask is
// 1: x when it is harder (larger for kLargest, else smaller) or NaN. A NaN,
// once taken, stays (no comparison with it is true), so the extreme carries
// NaN without a counter of its own. Values, not references: std::max of two
// array elements returns a reference to one, a branch that left the callers'
// loops scalar (GCC 12: "control flow in loop").
template <bool kLargest, typename T>
T HarderValue(T best, T x, T mask) {
  const T nan = x != x ? T(1) : T(0);
  const T harder = (kLargest ? x > best : x < best) ? T(1) : T(0);
  return mask * std::max(nan, harder) != T(0) ? x : best;
}

// OfferColumns for the values only (values_only of OfferRow): each column's
// largest positive and smallest negative distance, NaN when one is NaN.
template <typename T>
void OfferColumnValues(const T* tile, const int32_t* class_i, const int32_t* class_j, int64_t i0,
                       int64_t ni, int64_t j0, int64_t nj, MinerStats<T>* stats) {
  const T inf = std::numeric_limits<T>::infinity();
  thread_local std::vector<T> columns;
  columns.resize(2 * nj);
  T* largest = columns.data();
  T* smallest = columns.data() + nj;
  std::fill_n(largest, nj, -inf);
  std::fill_n(smallest, nj, inf);
  for (int64_t r = 0; r < ni; ++r) {
    const T* d = tile + r * nj;
    const int32_t ci = class_i[r];
    // Two arrays read and written per row (HarderValue keeps NaN).
#pragma omp simd
    for (int64_t c = 0; c < nj; ++c) {
      const T positive = class_j[c] == ci ? T(1) : T(0);
      largest[c] = HarderValue<true>(largest[c], d[c], positive);
      smallest[c] = HarderValue<false>(smallest[c], d[c], T(1) - positive);
    }
  }
  for (int64_t c = 0; c < nj; ++c) {
    stats->Offer(true, j0 + c, largest[c], i0);
    stats->Offer(false, j0 + c, smallest[c], i0);
  }
}

// Whether anchor i keeps its pair with j (d apart, a positive or negative
// pair) under miner M of the sweeps (kNone keeps every pair;
// kMultiSimilarity), as 0 or 1. batch_hard's pairs need no sweep
// (BatchHardLoss).
template <Miner M, typename T>
T MinerKeeps(MinerView<T> v, int64_t i, bool positive, T d) {
  static_assert(M != Miner::kBatchHard);
  if constexpr (M == Miner::kNone) {
    return T(1);
  } else {
    return multi_similarity_keeps(positive, d, positive ? v.negative_d[i] : v.positive_d[i],
                                  v.epsilon);
  }
}

// The masks of rows i and j at distance d (valid 0 for a row with itself,
// positive 1 for equal labels), row i's then column j's, with miner M's
// choices (without a miner both orders have the pair's own masks, and the
// sums are today's bits: 1·x is exact). kNegativesOnly: every positive mask
// is 0, known to the compiler, which then drops the positives' work.
template <Miner M, bool kNegativesOnly = false, typename T>
void PairMasks(MinerView<T> v, int64_t i, int64_t j, T valid, T positive, T d, T* kp, T* kn, T* kcp,
               T* kcn) {
  const T negative = valid - positive;
  *kp = kNegativesOnly ? T(0) : positive * MinerKeeps<M>(v, i, true, d);
  *kn = negative * MinerKeeps<M>(v, i, false, d);
  *kcp = kNegativesOnly ? T(0) : positive * MinerKeeps<M>(v, j, true, d);
  *kcn = negative * MinerKeeps<M>(v, j, false, d);
}

}  // namespace
}  // namespace FC_IN_BATCH_ISA
}  // namespace fused_contrastive
