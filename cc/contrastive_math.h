// The contrastive loss (Hadsell, Chopra & LeCun 2006, TF Addons' convention:
// y = 1 means "similar") and Keras' reduction rule, written once for every
// kernel: host, device and the XLA lowering.
#ifndef FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_
#define FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_

#include <math.h>

#include "numeric_types.h"

namespace fused_contrastive {

// The formula is generic over its element type so that the XLA lowering
// evaluates this very expression on xla::XlaOp values. Plain arithmetic types
// use these operations; the XLA file specialises ElementOps for XlaOp.
// IEEE square roots on host and device (nvcc's default -prec-sqrt=true).
FC_HOST_DEVICE inline float correctly_rounded_sqrt(float x) { return sqrtf(x); }
FC_HOST_DEVICE inline double correctly_rounded_sqrt(double x) { return ::sqrt(x); }

template <typename C>
struct ElementOps {
  FC_HOST_DEVICE static C constant(const C&, int value) { return C(value); }
  // max(x, 0), NaN for a NaN x (as XLA's max): a NaN distance must not turn
  // into a hinge of 0 (a loss of 0) or a clamped squared distance of 0.
  FC_HOST_DEVICE static C positive_part(const C& x) { return x <= C(0) ? C(0) : x; }
  // Keras' divide_no_nan: 0 where the denominator is 0.
  FC_HOST_DEVICE static C divide_no_nan(const C& x, const C& y) { return y == C(0) ? C(0) : x / y; }
  // For the embedding distances (embedding_math.h); sign(0) = 0.
  FC_HOST_DEVICE static C abs(const C& x) { return x < C(0) ? -x : x; }
  FC_HOST_DEVICE static C sign(const C& x) { return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0)); }
  FC_HOST_DEVICE static C sqrt(const C& x) { return correctly_rounded_sqrt(x); }
  // w·x, where a weight of exactly 0 contributes exactly 0 even when x is
  // infinite (0·inf is NaN: a dissimilar pair at a distance whose square
  // overflows, a similar pair under a margin whose square does); a NaN x
  // still gives NaN.
  FC_HOST_DEVICE static C weighted(const C& w, const C& x) {
    return w == C(0) && x == x ? C(0) : w * x;
  }
  // x where a 0/1 mask is 1, else exactly 0, even for an inf or NaN x (see
  // masked() in in_batch_math.h).
  FC_HOST_DEVICE static C masked(const C& mask, const C& x) { return mask != C(0) ? x : C(0); }
};

// The label value that marks a similar pair: 1 in TF Addons, 0 in the Hadsell
// paper and keras.io's Siamese example. Labels are used linearly, so with
// similar_label 0 a label y acts as 1 - y, exactly what TF Addons computes on
// labels flipped by the user.
inline bool IsValidSimilarLabel(int similar_label) {
  return similar_label == 0 || similar_label == 1;
}

template <typename C>
FC_HOST_DEVICE inline C similarity(const C& label, int similar_label) {
  return similar_label == 1 ? label : ElementOps<C>::constant(label, 1) - label;
}

// loss = y*d^2 + (1-y)*max(margin-d, 0)^2 and its derivative with respect to
// d, for y = similarity(label, similar_label).
// The operations are grouped exactly as the pure-TensorFlow reference so that
// float32/float64 losses agree bit for bit with it, and gradients with its
// autodiff for finite inputs (2*(y*d - (1-y)*h) equals y*(2*d) - (1-y)*(2*h)
// because scaling by 2 is exact). At IEEE edges (infinite labels, d*d
// overflowing) autodiff's inf - inf gives NaN where this form may not.
// A NaN distance gives a NaN loss and gradient through y*(d*d) whatever y is.
// A term whose label weight (y or 1-y) is exactly 0 contributes exactly 0
// (ElementOps::weighted), so that a square overflowing to inf in the unused
// term cannot make the loss NaN; other values keep the reference's bits.
template <typename C>
FC_HOST_DEVICE inline void contrastive_loss_and_grad(const C& label, const C& d, const C& margin,
                                                     int similar_label, C* loss, C* grad) {
  using Ops = ElementOps<C>;
  const C y = similarity(label, similar_label);
  const C hinge = Ops::positive_part(margin - d);
  const C dissimilar = Ops::constant(y, 1) - y;
  *loss = Ops::weighted(y, d * d) + Ops::weighted(dissimilar, hinge * hinge);
  *grad = Ops::constant(y, 2) * (Ops::weighted(y, d) - Ops::weighted(dissimilar, hinge));
}

// Elements the reductions sum in the (float32) compute type before the sum
// joins a double total, on CPU and under XLA: short enough that float rounding
// stays far below the 1e-6 relative accuracy the reduced loss must have (the
// bound for 32 non-negative terms is 31 ulp; typical error is far smaller),
// long enough that the double additions no longer dominate the work.
constexpr int kFloatSumChunk = 32;

// The Keras reductions the fused-reduction kernels implement.
enum class Reduction : int { kSum, kMean, kWeightedMean };

// What the weighted loss sum is multiplied by: loss_scale / divisor, where the
// divisor is 1 for kSum, the element count for kMean, and for kWeightedMean
// the weight total (the sum of per-element weights, or the weight itself when
// it is one scalar, as Keras does). A zero divisor gives 0 (divide_no_nan).
// loss_scale is Keras' 1/num_replicas_in_sync for means, 1 otherwise.
template <typename S>
FC_HOST_DEVICE inline S reduction_scale(Reduction reduction, const S& count,
                                        const S& weight_total, const S& loss_scale) {
  if (reduction == Reduction::kSum) return loss_scale;
  return ElementOps<S>::divide_no_nan(loss_scale,
                                      reduction == Reduction::kMean ? count : weight_total);
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_
