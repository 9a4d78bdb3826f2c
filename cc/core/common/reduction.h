// Keras' reductions as the fused-reduction kernels of every family implement
// them: the names, the divisor rule and the float-sum chunk.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_REDUCTION_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_REDUCTION_H_

#include <string>

#include "core/common/element_ops.h"

namespace fused_contrastive {

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
FC_HOST_DEVICE inline S reduction_scale(Reduction reduction, const S& count, const S& weight_total,
                                        const S& loss_scale) {
  if (reduction == Reduction::kSum) return loss_scale;
  return ElementOps<S>::divide_no_nan(loss_scale,
                                      reduction == Reduction::kMean ? count : weight_total);
}

// What every family's fused-reduction kernel reads and writes for the
// reduction itself; each family's args add its inputs and gradients.
struct ReductionArgs {
  const void* weights;  // the loss dtype: one per loss, or one when scalar_weight
  bool scalar_weight;
  Reduction kind;
  double loss_scale;        // Keras' 1/replicas for means, else 1 (see reduction_scale)
  void* loss;               // out: one value of the loss dtype
  double* reduction_scale;  // out: one value, reduction_scale()
};

// The names the TF op's attr and the pybind11 module use for the Keras
// reductions of reduction.h.
inline bool ParseReduction(const std::string& name, Reduction* out) {
  if (name == "sum") {
    *out = Reduction::kSum;
  } else if (name == "mean") {
    *out = Reduction::kMean;
  } else if (name == "weighted_mean") {
    *out = Reduction::kWeightedMean;
  } else {
    return false;
  }
  return true;
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_REDUCTION_H_
