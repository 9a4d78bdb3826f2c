// The op definitions and shape functions of the loss from pair embeddings:
//
//   EmbeddingContrastiveLoss        the loss from pair embeddings [..., D]:
//                                   per-pair loss and gradient coefficients
//   EmbeddingContrastiveLossGrad    its backward: gradients of both embeddings
//   EmbeddingContrastiveLossReduced the Keras reductions fused in: reduced loss
//                                   and fully scaled gradients, one pass
//   EmbeddingPairContrastiveLossReduced  the same on the stacked pair
//                                   [..., 2, D] a Keras model outputs, read
//                                   and its gradient written in place
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/ops/common.h"
#include "tf/pairs.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Embeddings a, b ([..., D], D >= 1) merged, or for a stacked Io the pairs
// [..., 2, D], and the labels' shape [...] merged with the labels. The rule
// CheckEmbeddingShapes applies to known shapes.
template <typename Io>
absl::Status EmbeddingShapes(InferenceContext* c, ShapeHandle* embeddings, ShapeHandle* rows) {
  const ShapeHandle labels = c->input(Io::kLabels);
  absl::Status mismatch;
  if constexpr (Io::kStacked) {
    *embeddings = c->input(Io::kPairs);
    mismatch = PairShapeMismatch(c->DebugString(labels), c->DebugString(*embeddings));
  } else {
    const ShapeHandle a = c->input(Io::kA);
    const ShapeHandle b = c->input(Io::kB);
    mismatch = EmbeddingShapeMismatch(c->DebugString(labels), c->DebugString(a), c->DebugString(b));
    if (!c->Merge(a, b, embeddings).ok()) return mismatch;
  }
  // The axes after the rows: [D], or the pair's [2, D].
  const int pair_axes = Io::kStacked ? 2 : 1;
  if (!c->WithRankAtLeast(*embeddings, pair_axes, embeddings).ok()) return mismatch;
  if (c->RankKnown(*embeddings)) {
    ShapeHandle pair;
    TF_RETURN_IF_ERROR(c->Subshape(*embeddings, -pair_axes, &pair));
    const auto dim = c->Dim(pair, -1);
    if (Io::kStacked && !c->Merge(pair, c->MakeShape({2, dim}), &pair).ok()) return mismatch;
    if (c->ValueKnown(dim) && c->Value(dim) < 1) return mismatch;
    TF_RETURN_IF_ERROR(c->Subshape(*embeddings, 0, -pair_axes, rows));
  } else {
    *rows = c->UnknownShape();
  }
  if (!c->Merge(labels, *rows, rows).ok()) return mismatch;
  return absl::OkStatus();
}

// Both reduced ops: on a and b, and on the stacked pair.
template <typename Io>
absl::Status ReducedShapes(InferenceContext* c) {
  ShapeHandle embeddings, rows;
  TF_RETURN_IF_ERROR(EmbeddingShapes<Io>(c, &embeddings, &rows));
  TF_RETURN_IF_ERROR(MergeWeights(c, Io::kWeights, rows));
  TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
  TF_RETURN_IF_ERROR(RequireScalar(c, Io::kLossScale));
  c->set_output(Io::kLoss, c->Scalar());
  if constexpr (Io::kStacked) {
    c->set_output(Io::kGrad, embeddings);
  } else {
    c->set_output(Io::kGradA, embeddings);
    c->set_output(Io::kGradB, embeddings);
  }
  c->set_output(Io::kReductionScale, c->Scalar());
  return absl::OkStatus();
}

int NumCoefficients(InferenceContext* c) {
  std::string name;
  Distance distance;
  if (!c->GetAttr("distance", &name).ok() || !ParseDistance(name, &distance)) return -1;
  return NumRowCoefficients(distance);
}

}  // namespace

REGISTER_OP(kEmbeddingOpName)
    .Input("labels: Tlabels")
    .Input("embeddings_a: T")
    .Input("embeddings_b: T")
    .Input("margin: double")
    .Output("loss: T")
    .Output("row_coefficients: double")
    .Attr(LabelTypesAttr())
    .Attr(DistanceTypesAttr())
    .Attr(DistanceAttr())
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      using Io = EmbeddingLossIo;
      ShapeHandle embeddings, rows, coefficients;
      TF_RETURN_IF_ERROR(EmbeddingShapes<Io>(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, Io::kMargin));
      TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(NumCoefficients(c)), &coefficients));
      c->set_output(Io::kLoss, rows);
      c->set_output(Io::kCoefficients, coefficients);
      return absl::OkStatus();
    })
    .Doc(R"doc(
The contrastive loss of each pair of embeddings (rows of embeddings_a and
embeddings_b, [..., D]) at their distance ('euclidean', 'cosine' or
'manhattan'), from one pass over the rows, and per row the coefficients of
d(loss)/d(embeddings) that EmbeddingContrastiveLossGrad applies. Labels [...]
are used linearly and get no gradient.
)doc");

REGISTER_OP(kEmbeddingGradOpName)
    .Input("embeddings_a: T")
    .Input("embeddings_b: T")
    .Input("row_coefficients: double")
    .Input("upstream: T")
    .Output("grad_a: T")
    .Output("grad_b: T")
    .Attr(DistanceTypesAttr())
    .Attr(DistanceAttr())
    .SetShapeFn([](InferenceContext* c) {
      using Io = EmbeddingGradIo;
      ShapeHandle embeddings;
      TF_RETURN_IF_ERROR(c->Merge(c->input(Io::kA), c->input(Io::kB), &embeddings));
      c->set_output(Io::kGradA, embeddings);
      c->set_output(Io::kGradB, embeddings);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradients of EmbeddingContrastiveLoss with respect to both embeddings, from
its row coefficients, scaled by the upstream gradient of each row's loss
(upstream [...], or a scalar for all rows).
)doc");

REGISTER_OP(kEmbeddingReducedOpName)
    .Input("labels: Tlabels")
    .Input("embeddings_a: T")
    .Input("embeddings_b: T")
    .Input("sample_weight: T")
    .Input("margin: double")
    .Input("loss_scale: double")
    .Output("loss: T")
    .Output("grad_a: T")
    .Output("grad_b: T")
    .Output("reduction_scale: double")
    .Attr(LabelTypesAttr())
    .Attr(DistanceTypesAttr())
    .Attr(DistanceAttr())
    .Attr(kReductionAttr)
    .Attr(kSimilarLabelAttr)
    .SetShapeFn(ReducedShapes<EmbeddingReducedIo>)
    .Doc(R"doc(
EmbeddingContrastiveLoss reduced as ContrastiveLossReduced reduces, and the
gradients of the reduced loss with respect to both embeddings (weights and
divisor applied), from one pass over the rows.
)doc");

REGISTER_OP(kEmbeddingPairReducedOpName)
    .Input("labels: Tlabels")
    .Input("pairs: T")
    .Input("sample_weight: T")
    .Input("margin: double")
    .Input("loss_scale: double")
    .Output("loss: T")
    .Output("grad: T")
    .Output("reduction_scale: double")
    .Attr(LabelTypesAttr())
    .Attr(DistanceTypesAttr())
    .Attr(DistanceAttr())
    .Attr(kReductionAttr)
    .Attr(kSimilarLabelAttr)
    .SetShapeFn(ReducedShapes<EmbeddingPairReducedIo>)
    .Doc(R"doc(
EmbeddingContrastiveLossReduced on the two embeddings of each pair stacked on
axis -2, pairs [..., 2, D] (a = pairs[..., 0, :], b = pairs[..., 1, :]), read
in place; grad is d(loss)/d(pairs), written in the same layout.
)doc");

}  // namespace fused_contrastive
