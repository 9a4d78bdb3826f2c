// The op definitions and shape functions of the loss on distances:
//
//   ContrastiveLoss         per-sample loss and d(loss)/d(distance)
//   ContrastiveLossReduced  the Keras reductions fused in: reduced loss and the
//                           per-sample gradient with weight and divisor applied
//   ScaleGradient           backward of the reduced ops: gradient * upstream
//                           scalar, a no-op when the upstream gradient is 1
#include "tf/distances.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/ops/common.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Labels and distances, merged, at the positions Io of either loss op.
template <typename Io>
absl::Status MergeLabelsAndDistances(InferenceContext* c, ShapeHandle* merged) {
  if (!c->Merge(c->input(Io::kLabels), c->input(Io::kDistances), merged).ok()) {
    return ShapeMismatch("distances", c->DebugString(c->input(Io::kLabels)),
                         c->DebugString(c->input(Io::kDistances)));
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP(kOpName)
    .Input("labels: Tlabels")
    .Input("distances: T")
    .Input("margin: double")
    .Output("loss: T")
    .Output("dloss_ddistances: T")
    .Attr(LabelTypesAttr())
    .Attr(DistanceTypesAttr())
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = ContrastiveLossIo;
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances<Io>(c, &merged));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      c->set_output(Io::kLoss, merged);
      c->set_output(Io::kGrad, merged);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Contrastive loss y*d^2 + (1-y)*max(margin-d, 0)^2 per element, and its
derivative with respect to the distances d, from one pass over the inputs.
y is the label when similar_label is 1 and 1 - label when it is 0. Labels are
used linearly (soft labels in [0, 1] work) and get no gradient.
)doc");

REGISTER_OP(kReducedOpName)
    .Input("labels: Tlabels")
    .Input("distances: T")
    .Input("sample_weight: T")
    .Input("margin: double")
    .Input("loss_scale: double")
    .Output("loss: T")
    .Output("dloss_ddistances: T")
    .Output("reduction_scale: double")
    .Attr(LabelTypesAttr())
    .Attr(DistanceTypesAttr())
    .Attr(kReductionAttr)
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = ContrastiveLossReducedIo;
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances<Io>(c, &merged));
      TF_RETURN_IF_ERROR(MergeWeights(c, Io::kWeights, merged));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kLossScale));
      c->set_output(Io::kLoss, c->Scalar());
      c->set_output(Io::kGrad, merged);
      c->set_output(Io::kReductionScale, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
The contrastive loss reduced as Keras does: sum(w * loss) * reduction_scale,
where reduction_scale = loss_scale / divisor with divisor 1 ('sum'), the element
count ('mean') or the sum of the weights ('weighted_mean'; the weight itself
when sample_weight is a scalar), and 0 when the divisor is 0. dloss_ddistances
is d(loss)/d(distances). sample_weight is a scalar or has the shape of distances.
)doc");

REGISTER_OP(kScaleOpName)
    .Input("gradient: T")
    .Input("scale: T")
    .Output("scaled: T")
    .Attr(DistanceTypesAttr())
    .SetShapeFn([](InferenceContext* c) {
      using Io = ScaleGradientIo;
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kScale));
      c->set_output(Io::kScaled, c->input(Io::kGradient));
      return absl::OkStatus();
    })
    .Doc("gradient * scale for a scalar scale; passes gradient through when scale is 1.");

}  // namespace fused_contrastive
