// The contrastive loss (Hadsell, Chopra & LeCun 2006, TF Addons' convention:
// y = 1 means "similar") and Keras' reduction rule, written once for every
// kernel: host, device and the XLA lowering.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_FORMULA_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_FORMULA_H_

#include <cmath>

#include "core/common/element_ops.h"

namespace fused_contrastive {

// Margins the loss is defined for (every entry point checks the same rule).
inline bool IsValidMargin(double margin) { return std::isfinite(margin) && margin >= 0; }

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

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_FORMULA_H_
