// The contrastive loss (Hadsell, Chopra & LeCun 2006, TF Addons' convention:
// y = 1 means "similar"), written once for every kernel, host and device.
#ifndef FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_
#define FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_

#include "numeric_types.h"

namespace fused_contrastive {

// The formula is generic over its element type so that the XLA lowering
// evaluates this very expression on xla::XlaOp values. Plain arithmetic types
// use these operations; the XLA file specialises ElementOps for XlaOp.
template <typename C>
struct ElementOps {
  FC_HOST_DEVICE static C constant(const C&, int value) { return C(value); }
  FC_HOST_DEVICE static C positive_part(const C& x) { return x > C(0) ? x : C(0); }
};

// loss = y*d^2 + (1-y)*max(margin-d, 0)^2 and its derivative with respect to d.
// The operations are grouped exactly as the pure-TensorFlow reference so that
// float32/float64 results agree bit for bit with it (and with its autodiff:
// 2*(y*d - (1-y)*h) equals y*(2*d) - (1-y)*(2*h) because scaling by 2 is exact).
// A NaN distance gives a NaN loss and gradient through y*(d*d) whatever y is.
template <typename C>
FC_HOST_DEVICE inline void contrastive_loss_and_grad(const C& y, const C& d, const C& margin,
                                                     C* loss, C* grad) {
  using Ops = ElementOps<C>;
  const C hinge = Ops::positive_part(margin - d);
  const C dissimilar = Ops::constant(y, 1) - y;
  *loss = y * (d * d) + dissimilar * (hinge * hinge);
  *grad = Ops::constant(y, 2) * (y * d - dissimilar * hinge);
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CONTRASTIVE_MATH_H_
