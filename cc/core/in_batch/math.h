// The in-batch all-pairs contrastive loss, per pair, written once for the CPU
// and CUDA kernels and the XLA lowering.
//
// Anchor i of a batch of B embeddings e (class labels c) has the loss
//   l_i = wp_i · Σ_{j≠i, c_j=c_i} t⁺(d_ij) + wn_i · Σ_{j≠i, c_j≠c_i} t⁻(d_ij)
// with t⁺(d) = max(d − positive_margin, 0)², t⁻(d) = max(margin − d, 0)² and
// the per-anchor weights of pair_weights(). A pair's distance comes from its
// Gram entry s_ij = e_i·e_j and one statistic per row (row_statistic), so the
// kernels get every distance of a block of pairs from one matrix product.
//
// Gradient. With g_i = d(objective)/d(l_i) and a pair's term slope t'(d_ij),
// the pair's coefficient A_ij = (g_i·w_i + g_j·w_j)·t'(d_ij) (w the pair's
// weight, positive or negative, of each anchor) is symmetric, and
//   d(objective)/de_i = q_i·e_i − Σ_j M_ij·e_j
// with M_ij = gram_coefficient(A_ij, ...) (symmetric too) and
// q_i = diagonal_factor_i · Σ_j diagonal_term(M_ij, s_ij). The kernels thus
// need a second matrix product, M·E, and per-row sums.
#ifndef FUSED_CONTRASTIVE_CORE_IN_BATCH_MATH_H_
#define FUSED_CONTRASTIVE_CORE_IN_BATCH_MATH_H_

#include <math.h>

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "core/common/distance.h"
#include "core/common/formula.h"

namespace fused_contrastive {

enum class PairWeighting : int { kUniform, kBalanced, kActive };

constexpr PairWeighting kAllPairWeightings[] = {PairWeighting::kUniform, PairWeighting::kBalanced,
                                                PairWeighting::kActive};

// The names of the `pair_weighting` attr and argument.
inline const char* PairWeightingName(PairWeighting w) {
  switch (w) {
    case PairWeighting::kUniform: return "uniform";
    case PairWeighting::kBalanced: return "balanced";
    default: return "active";
  }
}

// The pair miners (issue 21): which of an anchor's pairs count. kNone keeps
// every pair; kBatchHard the hardest positive (largest d) and the hardest
// negative (smallest d); kMultiSimilarity the positives farther than the
// hardest negative minus epsilon and the negatives closer than the hardest
// positive plus epsilon (multi_similarity_keeps).
enum class Miner : int { kNone, kBatchHard, kMultiSimilarity };

constexpr Miner kAllMiners[] = {Miner::kNone, Miner::kBatchHard, Miner::kMultiSimilarity};

// The names of the `miner` attr and argument ("none": Python's None).
inline const char* MinerName(Miner m) {
  switch (m) {
    case Miner::kNone: return "none";
    case Miner::kBatchHard: return "batch_hard";
    default: return "multi_similarity";
  }
}

// The value of `all` whose name_of() is `name`; false when none is.
template <typename E, size_t N>
bool ParseName(const std::string& name, const E (&all)[N], const char* (*name_of)(E), E* out) {
  for (E e : all) {
    if (name == name_of(e)) {
      *out = e;
      return true;
    }
  }
  return false;
}

inline bool ParsePairWeighting(const std::string& name, PairWeighting* out) {
  return ParseName(name, kAllPairWeightings, PairWeightingName, out);
}

inline bool ParseMiner(const std::string& name, Miner* out) {
  return ParseName(name, kAllMiners, MinerName, out);
}

// The distances the in-batch loss is defined for (a Gram matrix gives them).
constexpr Distance kInBatchDistances[] = {Distance::kEuclidean, Distance::kCosine};

inline bool IsInBatchDistance(Distance k) {
  for (Distance d : kInBatchDistances) {
    if (d == k) return true;
  }
  return false;
}

// Weights of anchor i's terms under a miner, from its counted kept pairs
// (counted_pair: kept ones; for "active", kept ones with a nonzero term):
// "uniform" the mean over every kept pair, "balanced" and "active" the mean
// over the counted positives plus the mean over the counted negatives.
template <typename C>
FC_HOST_DEVICE inline void mined_pair_weights(PairWeighting weighting, const C& positives,
                                              const C& negatives, C* positive_weight,
                                              C* negative_weight) {
  using Ops = ElementOps<C>;
  const C one = Ops::constant(positives, 1);
  if (weighting == PairWeighting::kUniform) {
    *positive_weight = *negative_weight = Ops::divide_no_nan(one, positives + negatives);
  } else {
    *positive_weight = Ops::divide_no_nan(one, positives);
    *negative_weight = Ops::divide_no_nan(one, negatives);
  }
}

// Weights of anchor i's positive and negative terms, given the batch size,
// the number of other rows with its label and, for "active" only, the
// number of its nonzero positive and negative terms (active_term; all as C:
// float64 in the kernels, XlaOps in the lowering). "uniform": 1/(B−1) each;
// "balanced": 1/positives and 1/negatives; "active": 1/(nonzero positive
// terms) and 1/(nonzero negative terms), so that a term that is 0 (a
// negative beyond the margin) does not dilute the mean. The active counts
// carry no gradient: the kernels count them in a sweep of their own before a
// gradient sweep. A mean over no pairs is 0 (divide_no_nan).
template <typename C>
FC_HOST_DEVICE inline void pair_weights(PairWeighting weighting, const C& rows, const C& positives,
                                        const C& active_positives, const C& active_negatives,
                                        C* positive_weight, C* negative_weight) {
  using Ops = ElementOps<C>;
  const C one = Ops::constant(rows, 1);
  const C others = rows - one;
  if (weighting == PairWeighting::kUniform) {
    *positive_weight = *negative_weight = Ops::divide_no_nan(one, others);
  } else if (weighting == PairWeighting::kBalanced) {
    *positive_weight = Ops::divide_no_nan(one, positives);
    *negative_weight = Ops::divide_no_nan(one, others - positives);
  } else {
    mined_pair_weights(weighting, active_positives, active_negatives, positive_weight,
                       negative_weight);
  }
}

// 1 for a pair's term that counts for "active" (nonzero: inside its hinge,
// or NaN, so that a NaN pair keeps the anchor's loss NaN), else 0; the
// kernels and the lowering add it up per anchor under the pair masks. The
// term comes by value: in the CPU sweep's `omp simd` loop, a reference to a
// field of its Pair makes GCC 12 keep a Pair per lane in memory, and the
// loop stays scalar (the counting sweep took 4.7x the plain forward sweep's
// time, cosine, B = 4096, D = 128; 1.06x by value).
template <typename C>
FC_HOST_DEVICE inline C active_term(C term) {
  return ElementOps<C>::nonzero(term);
}

// What a kept pair (keep 1; 0 for one not kept) adds to its anchor's count
// for mined_pair_weights: 1, or with active = 1 ("active"; else 0)
// active_term(term) (term 0 when not kept). Arithmetic, not a branch on a
// bool: the CPU sweep's vectorised loop takes no bool operand.
template <typename C>
FC_HOST_DEVICE inline C counted_pair(C active, C keep, C term) {
  return active * active_term(term) + (ElementOps<C>::constant(active, 1) - active) * keep;
}

// multi_similarity's selection, in distance form (Wang et al. 2019): a
// positive pair is kept unless d <= hardest negative − epsilon, a negative
// one unless d >= hardest positive + epsilon; 1 or 0. Negated comparisons,
// so that a NaN distance or a NaN hardest pair keeps the pair and the
// anchor's loss stays NaN. An anchor without negatives has hardest negative
// +inf (keeps no positive), one without positives −inf (keeps no negative).
template <typename C>
FC_HOST_DEVICE inline C multi_similarity_keeps(bool positive, C d, C hardest_other, C epsilon) {
  using Ops = ElementOps<C>;
  const C dropped = positive ? Ops::at_most(d, hardest_other - epsilon)
                             : Ops::at_most(hardest_other + epsilon, d);
  return Ops::constant(d, 1) - dropped;
}

// Whether partner j at distance d is harder for an anchor than its hardest
// so far (best, at row best_row; −1: none yet), on the positive side (larger
// d) or the negative one (smaller d): a NaN distance first, then the
// distance, then the lowest row. A total order, so the hardest pair does not
// depend on the order the pairs are offered in; j = −1 (no pair) is never
// harder.
template <typename C>
FC_HOST_DEVICE inline bool harder_pair(bool positive, C d, int64_t j, C best, int64_t best_row) {
  if (j < 0) return false;
  if (best_row < 0) return true;
  const bool nan = d != d, best_nan = best != best;
  if (nan || best_nan) return nan && (!best_nan || j < best_row);
  if (d != best) return positive ? d > best : d < best;
  return j < best_row;
}

// Whether an anchor keeps its pair with row j at distance d (1 or 0), from
// the anchor's hardest pairs (hardest_d, hardest_row: positive's, then
// negative's): batch_hard keeps the hardest rows, multi_similarity
// (multi_similarity_keeps) goes by distance, kNone keeps every pair. For the
// CUDA kernel, which applies each anchor's choice and its partners' in one
// pass per row.
template <typename C>
FC_HOST_DEVICE inline C miner_keeps(Miner miner, bool positive, C d, int64_t j, const C* hardest_d,
                                    const int64_t* hardest_row, C epsilon) {
  if (miner == Miner::kBatchHard) return j == hardest_row[positive ? 0 : 1] ? C(1) : C(0);
  if (miner == Miner::kMultiSimilarity) {
    return multi_similarity_keeps(positive, d, hardest_d[positive ? 1 : 0], epsilon);
  }
  return C(1);
}

// The row statistic from the row's squared norm: euclidean keeps ‖e‖²,
// cosine takes 1/‖e‖ (0 for a zero vector, whose similarity is then 0).
template <Distance K, typename C>
FC_HOST_DEVICE inline C row_statistic(const C& norm2) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    return norm2;
  } else {
    return Ops::divide_no_nan(Ops::constant(norm2, 1), Ops::sqrt(norm2));
  }
}

// The cosine distance is scale-invariant, but Σe² is not: it overflows at
// |e| ≈ 1e19 and underflows at 1e-20 in float32 (rows would count as zero
// vectors). A row whose largest magnitude `max_abs` has a binary exponent
// outside [−40, 40] (kCosineRowExponentLimit) is therefore used divided by
// 2^k, k that exponent: exact, its largest magnitude then in [0.5, 1); its
// gradient is divided by 2^k too. Returns k, or 0 for a row used as it is
// (bit for bit as without this rule: every row of moderate scale; zero, inf
// and NaN rows). The HLO lowering applies the same rule (CosineRowExponents).
constexpr int kCosineRowExponentLimit = 40;

template <typename C>
FC_HOST_DEVICE inline int cosine_row_exponent(C max_abs) {
  if (!(max_abs > C(0)) || !isfinite(max_abs)) return 0;
  const int k = binary_exponent(max_abs);
  return (k < -kCosineRowExponentLimit || k > kCosineRowExponentLimit) ? k : 0;
}

// Euclidean: ‖e_i‖² + ‖e_j‖² − 2·s_ij, clamped at 0 (rounding can take it
// below; NaN stays NaN, so a NaN embedding gives NaN distances). Cosine:
// 1 − s_ij/(‖e_i‖·‖e_j‖).
template <typename C>
FC_HOST_DEVICE inline C euclidean_squared(const C& s, const C& norm2_i, const C& norm2_j) {
  return ElementOps<C>::positive_part(norm2_i + norm2_j - ElementOps<C>::constant(s, 2) * s);
}

template <Distance K, typename C>
FC_HOST_DEVICE inline C pair_distance(const C& s, const C& stat_i, const C& stat_j) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    return Ops::sqrt(euclidean_squared(s, stat_i, stat_j));
  } else {
    return Ops::constant(s, 1) - s * stat_i * stat_j;
  }
}

// ‖e_i‖² + ‖e_j‖² − 2·s_ij cancels when e_i and e_j are close: its rounding
// error is a few ulp of ‖e_i‖² + ‖e_j‖² (measured: at most 4.5 ulp), so a
// pair's relative error of d² is about 4.5·ulp/(fraction). Below this
// fraction of that sum the CPU and CUDA kernels compute the pair's distance
// and gradient directly from e_i − e_j, so equal rows get exactly d = 0 and
// no gradient, and close rows an accurate distance. The fractions keep the
// relative error of every pair's d² under README's bounds, 2e-4 (float32)
// and 1e-9 (float64): measured at most 1.1e-4 and 4.0e-10 just above them.
template <typename C>
struct GramCancellation;
template <>
struct GramCancellation<float> {
  static constexpr float value = 1.0f / 512;  // 2^14 float ulp
};
template <>
struct GramCancellation<double> {
  static constexpr double value = 1.0 / (1LL << 20);  // 2^32 double ulp
};

template <typename C>
FC_HOST_DEVICE inline bool gram_distance_cancels(const C& squared, const C& norm2_i,
                                                 const C& norm2_j) {
  return squared <= GramCancellation<C>::value * (norm2_i + norm2_j);
}

// A pair's share of a sum under a 0/1 mask (CPU kernel and HLO lowering):
// selected, not multiplied, so that a pair outside the mask adds exactly 0
// even where its value is inf (a negative term at margin 1e30 in float32) or
// NaN (the row with itself), while a NaN pair inside the mask (a NaN
// embedding) makes the anchor's sums NaN.
template <typename C>
FC_HOST_DEVICE inline C masked(const C& mask, const C& value) {
  return ElementOps<C>::masked(mask, value);
}

// A positive pair's term max(d − positive_margin, 0)² and a negative pair's
// max(margin − d, 0)², with their slopes d(term)/d(d); NaN for a NaN d (a
// NaN partner makes the anchor's loss and gradient NaN on every path).
template <typename C>
FC_HOST_DEVICE inline void positive_term(const C& d, const C& positive_margin, C* term, C* slope) {
  const C h = ElementOps<C>::positive_part(d - positive_margin);
  *term = h * h;
  *slope = ElementOps<C>::constant(h, 2) * h;
}

template <typename C>
FC_HOST_DEVICE inline void negative_term(const C& d, const C& margin, C* term, C* slope) {
  const C h = ElementOps<C>::positive_part(margin - d);
  *term = h * h;
  *slope = ElementOps<C>::constant(h, 0) - ElementOps<C>::constant(h, 2) * h;
}

// M_ij from the pair's coefficient A_ij = (g_i·w_i + g_j·w_j)·t'(d_ij).
// Euclidean: dd/de_i = (e_i − e_j)/d, so M = A/d, and 0 at d = 0 (the
// subgradient of ‖·‖ at 0). Cosine: dd/de_i = −e_j/(‖e_i‖‖e_j‖) + s·e_i/
// (‖e_i‖³‖e_j‖), so M = A/(‖e_i‖‖e_j‖), 0 for a zero vector.
template <Distance K, typename C>
FC_HOST_DEVICE inline C gram_coefficient(const C& coefficient, const C& d, const C& stat_i,
                                         const C& stat_j) {
  if constexpr (K == Distance::kEuclidean) {
    return ElementOps<C>::divide_no_nan(coefficient, d);
  } else {
    return coefficient * stat_i * stat_j;
  }
}

// What a pair adds to the sum in q_i, and the row factor q_i is scaled by.
template <Distance K, typename C>
FC_HOST_DEVICE inline C diagonal_term(const C& m, const C& s) {
  if constexpr (K == Distance::kEuclidean) {
    return m;
  } else {
    return m * s;
  }
}

template <Distance K, typename C>
FC_HOST_DEVICE inline C diagonal_factor(const C& stat) {
  if constexpr (K == Distance::kEuclidean) {
    return ElementOps<C>::constant(stat, 1);
  } else {
    return stat * stat;
  }
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_IN_BATCH_MATH_H_
