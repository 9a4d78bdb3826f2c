// The loss on distances (ContrastiveLoss, ContrastiveLossReduced,
// ScaleGradient) as its op definitions, OpKernels and XLA lowerings share it:
// the ops' inputs and outputs by name, and their shape rules on known shapes.
#ifndef FUSED_CONTRASTIVE_TF_DISTANCES_H_
#define FUSED_CONTRASTIVE_TF_DISTANCES_H_

#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/names.h"
#include "tf/registry.h"

namespace fused_contrastive {

// Positions in the order of the op definitions (ops/distances.cc).
struct ContrastiveLossIo {
  enum Input { kLabels, kDistances, kMargin };
  enum Output { kLoss, kGrad };
};

struct ContrastiveLossReducedIo {
  enum Input { kLabels, kDistances, kWeights, kMargin, kLossScale };
  enum Output { kLoss, kGrad, kReductionScale };
};

struct ScaleGradientIo {
  enum Input { kGradient, kScale };
  enum Output { kScaled };
};

inline absl::Status CheckDistanceShapes(const tensorflow::TensorShape& labels,
                                        const tensorflow::TensorShape& distances) {
  if (labels == distances) return absl::OkStatus();
  return ShapeMismatch("distances", labels.DebugString(), distances.DebugString());
}

// The reduced op's sample_weight: a scalar or of the distances' shape.
inline absl::Status CheckDistanceWeights(const tensorflow::TensorShape& weights,
                                         const tensorflow::TensorShape& distances) {
  if (weights.dims() == 0 || weights == distances) return absl::OkStatus();
  return ShapeMismatch("sample_weight", distances.DebugString(), weights.DebugString());
}

// For the registration table: kernels/distances.cc and xla/distances.cc.
extern const OpKernels kContrastiveLossKernels;
extern const OpKernels kContrastiveLossReducedKernels;
extern const OpKernels kScaleGradientKernels;
extern const XlaKernels kContrastiveLossXla;
extern const XlaKernels kContrastiveLossReducedXla;
extern const XlaKernels kScaleGradientXla;

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_DISTANCES_H_
