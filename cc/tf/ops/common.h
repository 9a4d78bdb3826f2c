// What the op definitions of every family share: shape-function pieces, and
// the convention for margins below.
//
// A margin is a float64 scalar input rather than a float attr: TensorFlow's
// float attrs are 32-bit (margins such as 0.1 would be rounded before float64
// math) and eager execution cannot pass tensor-valued attrs. As an input it
// can also be a variable (a margin schedule). It lives in host memory on
// every device.
#ifndef FUSED_CONTRASTIVE_TF_OPS_COMMON_H_
#define FUSED_CONTRASTIVE_TF_OPS_COMMON_H_

#include "tensorflow/core/framework/shape_inference.h"
#include "tf/names.h"

namespace fused_contrastive {

inline absl::Status RequireScalar(tensorflow::shape_inference::InferenceContext* c, int input) {
  tensorflow::shape_inference::ShapeHandle unused;
  return c->WithRank(c->input(input), 0, &unused);
}

// The reduced ops' sample_weight input: a scalar or of the per-row losses'
// shape `rows`.
inline absl::Status MergeWeights(tensorflow::shape_inference::InferenceContext* c, int input,
                                 tensorflow::shape_inference::ShapeHandle rows) {
  tensorflow::shape_inference::ShapeHandle weights = c->input(input);
  if (c->RankKnown(weights) && c->Rank(weights) != 0) {
    tensorflow::shape_inference::ShapeHandle unused;
    if (!c->Merge(rows, weights, &unused).ok()) {
      return ShapeMismatch("sample_weight", c->DebugString(rows), c->DebugString(weights));
    }
  }
  return absl::OkStatus();
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_OPS_COMMON_H_
