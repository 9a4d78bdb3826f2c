// The distances between the two embeddings of a pair, and their gradients,
// written once for the CPU and CUDA kernels and the XLA lowering. A pair is
// two rows a, b of D elements; the row's distance d comes from up to three
// sums over the row, and d(loss)/da, d(loss)/db are linear in a and b with
// per-row coefficients, so a kernel reads each row to sum it, computes the
// row's loss and coefficients once, and reads the row again (from cache) to
// write the gradients.
#ifndef FUSED_CONTRASTIVE_CORE_PAIRS_MATH_H_
#define FUSED_CONTRASTIVE_CORE_PAIRS_MATH_H_

#include <string>

#include "core/common/distance.h"
#include "core/common/formula.h"

namespace fused_contrastive {

// Sums per row: euclidean Σ(a−b)²; cosine Σab, Σaa, Σbb; manhattan Σ|a−b|.
// Cosine rows also carry the scales s_a, s_b their sums were taken at
// (cosine_scale): a row's values are its sums, then those two.
FC_HOST_DEVICE constexpr int NumRowSums(Distance k) { return k == Distance::kCosine ? 3 : 1; }
FC_HOST_DEVICE constexpr int NumRowValues(Distance k) { return k == Distance::kCosine ? 5 : 1; }
// Values per row the gradient reads (see row_coefficients): NumRowSums
// coefficients, linear in d(loss)/d(d), then cosine's two scales.
FC_HOST_DEVICE constexpr int NumRowCoefficients(Distance k) { return NumRowValues(k); }
constexpr int kMaxRowSums = 3;
constexpr int kMaxRowValues = 5;

// Elements of a row that the kernels sum in the compute type before the
// partial sum joins the row's double total (CPU and CUDA alike). Float sums
// of whole long rows lose accuracy with the row's length (a relative error
// of 5.5e-5 at D = 1e6); per chunk it stays at float rounding of a short sum.
// Rows up to this length are one chunk: their sums have the bits of a plain
// float sum. A multiple of the CUDA kernel's warp-wide step (32 lanes × 16
// bytes), so that its chunks start on whole steps.
constexpr int kRowSumChunk = 1024;

// What one element of a row adds to the row's sums (t1 and t2 are written by
// cosine only). Three scalar outputs, not an array: GCC vectorises the CPU
// kernel's row loop only when the terms are plain scalars.
template <Distance K, typename C>
FC_HOST_DEVICE inline void distance_terms(const C& a, const C& b, C& t0, C& t1, C& t2) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    const C diff = a - b;
    t0 = diff * diff;
  } else if constexpr (K == Distance::kCosine) {
    t0 = a * b;
    t1 = a * a;
    t2 = b * b;
  } else {
    t0 = Ops::abs(a - b);
  }
}

// Cosine is scale-invariant, its sums Σa², Σb² are not: at scale 1e19 they
// overflow float32 (a NaN loss), at 1e-20 the squares underflow (the vectors
// look like zero vectors). The kernels therefore sum a row again as s_a·a,
// s_b·b when its Σa² or Σb² leaves [kLow, kHigh], where s_a, s_b are powers
// of two that bring each vector's largest |element| into [0.5, 1) (at most
// 2^±kMaxShift, normal numbers). Power-of-two scalings are exact, so the
// similarity keeps its bits, and rows inside the range (scales 1) are
// unchanged. Inside it, squares lost to underflow weigh at most D·2^-66 of a
// float32 sum. NaN sums are left alone: scaling cannot help them.
template <typename C>
struct CosineScaling;
template <>
struct CosineScaling<float> {
  static constexpr float kLow = 0x1p-60f, kHigh = 0x1p100f;
  static constexpr int kMaxShift = 100;
};
template <>
struct CosineScaling<double> {
  static constexpr double kLow = 0x1p-900, kHigh = 0x1p900;
  static constexpr int kMaxShift = 1000;
};

template <typename C>
FC_HOST_DEVICE inline bool cosine_sums_out_of_range(const C* sums) {
  using S = CosineScaling<C>;
  return sums[1] < S::kLow || sums[1] > S::kHigh || sums[2] < S::kLow || sums[2] > S::kHigh;
}

// The scale of a vector whose largest |element| is max_abs (see
// CosineScaling): 1 when it is 0 or not finite.
template <typename C>
FC_HOST_DEVICE inline C cosine_scale(const C& max_abs) {
  if (!(max_abs > C(0)) || max_abs - max_abs != C(0)) return C(1);
  int shift = -binary_exponent(max_abs);
  const int limit = CosineScaling<C>::kMaxShift;
  shift = shift < -limit ? -limit : (shift > limit ? limit : shift);
  return power_of_two(max_abs, shift);
}

// The row's distance from its sums. Cosine: d = 1 − Σab / (‖a‖·‖b‖), where a
// zero norm (or a product of norms that underflows to 0) gives similarity 0,
// d = 1. d is not clamped: rounding may take it a few ulp outside [0, 2].
template <Distance K, typename C>
FC_HOST_DEVICE inline C distance_from_sums(const C* sums) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    return Ops::sqrt(sums[0]);
  } else if constexpr (K == Distance::kCosine) {
    return Ops::constant(sums[0], 1) -
           Ops::divide_no_nan(sums[0], Ops::sqrt(sums[1]) * Ops::sqrt(sums[2]));
  } else {
    return sums[0];
  }
}

// Coefficients of the gradient given g = d(loss)/d(d), so that
//   euclidean:  dL/da =  c0·(a − b),            dL/db = −dL/da
//   cosine:     dL/da =  c1·a + c0·b,           dL/db =  c2·b + c0·a
//   manhattan:  dL/da =  c0·sign(a − b),        dL/db = −dL/da
// The first NumRowSums are linear in g: scaling them scales the gradients
// (sample weights, the reduction's divisor, the upstream gradient). Cosine
// coefficients are those of the scaled rows a' = s_a·a, b' = s_b·b its sums
// were taken at, and c3, c4 = s_a, s_b: dL/da = s_a·(c1·a' + c0·b') (see
// element_gradient), so no coefficient over- or underflows.
// Zero distance (a == b, Euclidean): c0 = 0, the subgradient PyTorch's cdist
// and vector_norm use. A similar pair's gradient 2·y·(a − b) is then exactly
// its value; the hinge term of a dissimilar pair, whose direction is undefined
// there, contributes 0. Zero norm (cosine): no gradient, to either vector.
template <Distance K, typename C>
FC_HOST_DEVICE inline void row_coefficients(const C* sums, const C& d, const C& g, C* coef) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    coef[0] = Ops::divide_no_nan(g, d);
  } else if constexpr (K == Distance::kCosine) {
    const C norms = Ops::sqrt(sums[1]) * Ops::sqrt(sums[2]);
    const C similarity = Ops::constant(d, 1) - d;
    // d = 1 − s: dd/da = −b/(‖a‖‖b‖) + s·a/‖a‖², symmetric for b.
    coef[0] = Ops::constant(g, 0) - Ops::divide_no_nan(g, norms);
    coef[1] = Ops::divide_no_nan(g * similarity, sums[1]);
    coef[2] = Ops::divide_no_nan(g * similarity, sums[2]);
    coef[3] = sums[3];
    coef[4] = sums[4];
  } else {
    coef[0] = g;
  }
}

// d(loss)/da and d(loss)/db of one element from the row's coefficients.
template <Distance K, typename C>
FC_HOST_DEVICE inline void element_gradient(const C* coef, const C& a, const C& b, C* grad_a,
                                            C* grad_b) {
  using Ops = ElementOps<C>;
  if constexpr (K == Distance::kEuclidean) {
    *grad_a = coef[0] * (a - b);
    *grad_b = Ops::constant(a, 0) - *grad_a;
  } else if constexpr (K == Distance::kCosine) {
    const C a_scaled = coef[3] * a;
    const C b_scaled = coef[4] * b;
    *grad_a = coef[3] * (coef[1] * a_scaled + coef[0] * b_scaled);
    *grad_b = coef[4] * (coef[2] * b_scaled + coef[0] * a_scaled);
  } else {
    *grad_a = coef[0] * Ops::sign(a - b);
    *grad_b = Ops::constant(a, 0) - *grad_a;
  }
}

// One row's loss and gradient coefficients (for g = d(loss)/d(d)) from its
// values (NumRowValues: sums, and cosine's scales).
template <Distance K, typename C>
FC_HOST_DEVICE inline void row_loss_and_coefficients(const C* sums, const C& label, const C& margin,
                                                     int similar_label, C* loss, C* coef) {
  const C d = distance_from_sums<K>(sums);
  C g;
  contrastive_loss_and_grad(label, d, margin, similar_label, loss, &g);
  row_coefficients<K>(sums, d, g, coef);
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_PAIRS_MATH_H_
