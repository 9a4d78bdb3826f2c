// The op definitions and shape functions of the in-batch all-pairs loss:
//
//   InBatchContrastiveLoss          all pairs of a batch [B, D] with class
//                                   labels [B]: per-anchor loss [B]
//   InBatchContrastiveLossGrad      its backward, d(Σ upstream·loss)/d(embeddings)
//   InBatchContrastiveLossReduced   the Keras reductions fused in: reduced loss
//                                   and fully scaled gradient, one sweep
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/in_batch.h"
#include "tf/ops/common.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

const std::string kInBatchTypes = TypeListAttr("T", IsInBatchDType);
const std::string kInBatchDistanceAttr = NamesAttr("distance", kInBatchDistances, DistanceName);
const std::string kPairWeightingAttr =
    NamesAttr("pair_weighting", kAllPairWeightings, PairWeightingName);
constexpr char kMaxBlockRowsAttr[] = "max_block_rows: int >= 0 = 0";
const std::string kMinerAttr = NamesAttr("miner", kAllMiners, MinerName) + " = 'none'";
constexpr char kMinerEpsilonAttr[] = "miner_epsilon: float = 0.1";

// Embeddings [B, D] and labels [B] merged: B, and anchors [2]. The rules
// CheckInBatchShapes and CheckInBatchAnchors apply to known shapes; the
// positions are those of all three ops.
absl::Status InBatchShapes(InferenceContext* c, ShapeHandle* embeddings, ShapeHandle* rows) {
  using Io = InBatchLossIo;
  ShapeHandle anchors;
  ::tensorflow::shape_inference::DimensionHandle values;
  if (!c->WithRank(c->input(Io::kAnchors), 1, &anchors).ok() ||
      !c->WithValue(c->Dim(anchors, 0), kInBatchAnchorValues, &values).ok()) {
    return InBatchAnchorsShapeError(c->DebugString(c->input(Io::kAnchors)));
  }
  const absl::Status mismatch = InBatchShapeMismatch(c->DebugString(c->input(Io::kLabels)),
                                                     c->DebugString(c->input(Io::kEmbeddings)));
  if (!c->WithRank(c->input(Io::kEmbeddings), 2, embeddings).ok()) return mismatch;
  if (!c->Merge(c->input(Io::kLabels), c->Vector(c->Dim(*embeddings, 0)), rows).ok()) {
    return mismatch;
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP(kInBatchOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
    .Input("anchors: int64")
    .Input("margin: double")
    .Input("positive_margin: double")
    .Output("loss: T")
    .Attr(kInBatchTypes)
    .Attr(kInBatchDistanceAttr)
    .Attr(kPairWeightingAttr)
    .Attr(kMaxBlockRowsAttr)
    .Attr(kMinerAttr)
    .Attr(kMinerEpsilonAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = InBatchLossIo;
      ShapeHandle embeddings, rows;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kPositiveMargin));
      c->set_output(Io::kLoss, rows);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Per-anchor contrastive loss over every ordered pair (i, j), j != i, of a batch
of embeddings [B, D] with class labels [B] (equal labels: positive pair),
computed in blocks of rows (at most max_block_rows; 0: the kernel's choice)
without ever holding a B x B matrix. Only rows anchors[0] <= i < anchors[1]
are anchors; the others below anchors[3] are partners only (loss 0; gradient
0 from anchors[2] on), and pairs of two partners are not computed; rows from
anchors[3] on take no part (loss and gradient 0).
)doc");

REGISTER_OP(kInBatchGradOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
    .Input("anchors: int64")
    .Input("upstream: T")
    .Input("margin: double")
    .Input("positive_margin: double")
    .Output("grad: T")
    .Output("loss: T")
    .Attr(kInBatchTypes)
    .Attr(kInBatchDistanceAttr)
    .Attr(kPairWeightingAttr)
    .Attr(kMaxBlockRowsAttr)
    .Attr(kMinerAttr)
    .Attr(kMinerEpsilonAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = InBatchGradIo;
      ShapeHandle embeddings, rows, unused;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(c->Merge(c->input(Io::kUpstream), rows, &unused));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kPositiveMargin));
      c->set_output(Io::kGrad, embeddings);
      c->set_output(Io::kLoss, rows);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of sum(upstream * InBatchContrastiveLoss) with respect to the
embeddings, from one sweep over the pairs, and the loss
(InBatchContrastiveLoss's output) from the same sweep.
)doc");

REGISTER_OP(kInBatchReducedOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
    .Input("anchors: int64")
    .Input("sample_weight: T")
    .Input("margin: double")
    .Input("positive_margin: double")
    .Input("loss_scale: double")
    .Output("loss: T")
    .Output("grad: T")
    .Output("reduction_scale: double")
    .Attr(kInBatchTypes)
    .Attr(kInBatchDistanceAttr)
    .Attr(kPairWeightingAttr)
    .Attr(kMaxBlockRowsAttr)
    .Attr(kMinerAttr)
    .Attr(kMinerEpsilonAttr)
    .Attr(kReductionAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = InBatchReducedIo;
      ShapeHandle embeddings, rows;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      // One weight per anchor: their count is known when the kernel runs.
      TF_RETURN_IF_ERROR(MergeWeights(c, Io::kWeights, c->Vector(c->UnknownDim())));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kPositiveMargin));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kLossScale));
      c->set_output(Io::kLoss, c->Scalar());
      c->set_output(Io::kGrad, embeddings);
      c->set_output(Io::kReductionScale, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
InBatchContrastiveLoss reduced as ContrastiveLossReduced reduces (a scalar
sample weight or one per anchor; the mean counts the anchors), and the gradient of the reduced loss with respect to the
embeddings, from one sweep over the pairs.
)doc");

}  // namespace fused_contrastive
