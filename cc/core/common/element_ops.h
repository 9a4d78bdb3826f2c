// Element operations the formulas are written in, for plain arithmetic types
// on host and device; the XLA lowering specialises ElementOps for XlaOp.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_ELEMENT_OPS_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_ELEMENT_OPS_H_

#include <math.h>

#include "core/common/numeric_types.h"

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
  // For the embedding distances (core/pairs/math.h); sign(0) = 0.
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
  // masked() in core/in_batch/math.h).
  FC_HOST_DEVICE static C masked(const C& mask, const C& x) { return mask != C(0) ? x : C(0); }
  // 1 where x is not 0 (NaN included), else 0.
  FC_HOST_DEVICE static C nonzero(const C& x) { return x != C(0) ? C(1) : C(0); }
  // 1 where x <= y, else 0 (NaN on either side included).
  FC_HOST_DEVICE static C at_most(const C& x, const C& y) { return x <= y ? C(1) : C(0); }
};

FC_HOST_DEVICE inline int binary_exponent(float x) {
  int e;
  frexpf(x, &e);
  return e;
}
FC_HOST_DEVICE inline int binary_exponent(double x) {
  int e;
  ::frexp(x, &e);
  return e;
}
FC_HOST_DEVICE inline float power_of_two(float, int e) { return ldexpf(1.0f, e); }
FC_HOST_DEVICE inline double power_of_two(double, int e) { return ::ldexp(1.0, e); }

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_ELEMENT_OPS_H_
