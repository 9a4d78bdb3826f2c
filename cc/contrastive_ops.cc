// The op definitions and shape functions (the kernels are in
// contrastive_op_kernels.cc and contrastive_xla.cc):
//
//   ContrastiveLoss         per-sample loss and d(loss)/d(distance)
//   ContrastiveLossReduced  the Keras reductions fused in: reduced loss and the
//                           per-sample gradient with weight and divisor applied
//   ScaleGradient           backward of the reduced ops: gradient * upstream
//                           scalar, a no-op when the upstream gradient is 1
//   EmbeddingContrastiveLoss        the loss from pair embeddings [..., D]:
//                                   per-pair loss and gradient coefficients
//   EmbeddingContrastiveLossGrad    its backward: gradients of both embeddings
//   EmbeddingContrastiveLossReduced the Keras reductions fused in: reduced loss
//                                   and fully scaled gradients, one pass
//   EmbeddingPairContrastiveLossReduced  the same on the stacked pair
//                                   [..., 2, D] a Keras model outputs, read
//                                   and its gradient written in place
//   InBatchContrastiveLoss          all pairs of a batch [B, D] with class
//                                   labels [B]: per-anchor loss [B]
//   InBatchContrastiveLossGrad      its backward, d(Σ upstream·loss)/d(embeddings)
//   InBatchContrastiveLossReduced   the Keras reductions fused in: reduced loss
//                                   and fully scaled gradient, one sweep
//
// margin is a float64 scalar input rather than a float attr: TensorFlow's float
// attrs are 32-bit (margins such as 0.1 would be rounded before float64 math)
// and eager execution cannot pass tensor-valued attrs. As an input it can also
// be a variable (a margin schedule). It lives in host memory on every device.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf_shared.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Labels and distances, merged; shared by both loss ops' shape functions.
absl::Status MergeLabelsAndDistances(InferenceContext* c, ShapeHandle* merged) {
  if (!c->Merge(c->input(0), c->input(1), merged).ok()) {
    return ShapeMismatch("distances", c->DebugString(c->input(0)), c->DebugString(c->input(1)));
  }
  return absl::OkStatus();
}

absl::Status RequireScalar(InferenceContext* c, int input) {
  ShapeHandle unused;
  return c->WithRank(c->input(input), 0, &unused);
}

// Embeddings a, b ([..., D], D >= 1) merged, and the labels' shape [...].
absl::Status EmbeddingShapes(InferenceContext* c, ShapeHandle* embeddings, ShapeHandle* rows) {
  const absl::Status mismatch = EmbeddingShapeMismatch(
      c->DebugString(c->input(0)), c->DebugString(c->input(1)), c->DebugString(c->input(2)));
  if (!c->Merge(c->input(1), c->input(2), embeddings).ok() ||
      !c->WithRankAtLeast(*embeddings, 1, embeddings).ok()) {
    return mismatch;
  }
  if (c->RankKnown(*embeddings)) {
    const auto dim = c->Dim(*embeddings, -1);
    if (c->ValueKnown(dim) && c->Value(dim) < 1) return mismatch;
    TF_RETURN_IF_ERROR(c->Subshape(*embeddings, 0, -1, rows));
  } else {
    *rows = c->UnknownShape();
  }
  if (!c->Merge(c->input(0), *rows, rows).ok()) return mismatch;
  return absl::OkStatus();
}

// Stacked pairs [..., 2, D] (input 1, D >= 1) and the labels' shape [...]
// merged with input 0.
absl::Status PairShapes(InferenceContext* c, ShapeHandle* pairs, ShapeHandle* rows) {
  const absl::Status mismatch =
      PairShapeMismatch(c->DebugString(c->input(0)), c->DebugString(c->input(1)));
  if (!c->WithRankAtLeast(c->input(1), 2, pairs).ok()) return mismatch;
  if (c->RankKnown(*pairs)) {
    ShapeHandle pair;
    TF_RETURN_IF_ERROR(c->Subshape(*pairs, -2, &pair));
    const auto dim = c->Dim(pair, 1);
    if (!c->Merge(pair, c->MakeShape({2, dim}), &pair).ok() ||
        (c->ValueKnown(dim) && c->Value(dim) < 1)) {
      return mismatch;
    }
    TF_RETURN_IF_ERROR(c->Subshape(*pairs, 0, -2, rows));
  } else {
    *rows = c->UnknownShape();
  }
  if (!c->Merge(c->input(0), *rows, rows).ok()) return mismatch;
  return absl::OkStatus();
}

// A sample_weight input: a scalar or of the per-row losses' shape `rows`.
absl::Status PerRowWeights(InferenceContext* c, int input, ShapeHandle rows) {
  ShapeHandle weights = c->input(input);
  if (c->RankKnown(weights) && c->Rank(weights) != 0) {
    ShapeHandle unused;
    if (!c->Merge(rows, weights, &unused).ok()) {
      return ShapeMismatch("sample_weight", c->DebugString(rows), c->DebugString(weights));
    }
  }
  return absl::OkStatus();
}

const std::string kLabelTypes = TypeListAttr("Tlabels", AnyDType);
const std::string kDistanceTypes = TypeListAttr("T", IsDistanceDType);
constexpr char kSimilarLabelAttr[] = "similar_label: int = 1";
const std::string kDistanceAttr = DistanceAttr();
const std::string kInBatchTypes = TypeListAttr("T", IsInBatchDType);
const std::string kInBatchDistanceAttr = NamesAttr("distance", kInBatchDistances, DistanceName);
const std::string kPairWeightingAttr =
    NamesAttr("pair_weighting", kAllPairWeightings, PairWeightingName);
constexpr char kMaxBlockRowsAttr[] = "max_block_rows: int >= 0 = 0";

// Embeddings [B, D] and labels [B] merged: B.
absl::Status InBatchShapes(InferenceContext* c, ShapeHandle* embeddings, ShapeHandle* rows) {
  const absl::Status mismatch =
      InBatchShapeMismatch(c->DebugString(c->input(0)), c->DebugString(c->input(1)));
  if (!c->WithRank(c->input(1), 2, embeddings).ok()) return mismatch;
  if (!c->Merge(c->input(0), c->Vector(c->Dim(*embeddings, 0)), rows).ok()) return mismatch;
  return absl::OkStatus();
}

int NumCoefficients(InferenceContext* c) {
  std::string name;
  Distance distance;
  if (!c->GetAttr("distance", &name).ok() || !ParseDistance(name, &distance)) return -1;
  return NumRowCoefficients(distance);
}

}  // namespace

REGISTER_OP(kOpName)
    .Input("labels: Tlabels")
    .Input("distances: T")
    .Input("margin: double")
    .Output("loss: T")
    .Output("dloss_ddistances: T")
    .Attr(kLabelTypes)
    .Attr(kDistanceTypes)
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances(c, &merged));
      TF_RETURN_IF_ERROR(RequireScalar(c, 2));
      c->set_output(0, merged);
      c->set_output(1, merged);
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
    .Attr(kLabelTypes)
    .Attr(kDistanceTypes)
    .Attr("reduction: {'sum', 'mean', 'weighted_mean'}")
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances(c, &merged));
      ShapeHandle weights = c->input(2);
      if (c->RankKnown(weights) && c->Rank(weights) != 0) {
        ShapeHandle unused;
        if (!c->Merge(merged, weights, &unused).ok()) {
          return ShapeMismatch("sample_weight", c->DebugString(merged), c->DebugString(weights));
        }
      }
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      c->set_output(0, c->Scalar());
      c->set_output(1, merged);
      c->set_output(2, c->Scalar());
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
    .Attr(kDistanceTypes)
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(RequireScalar(c, 1));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("gradient * scale for a scalar scale; passes gradient through when scale is 1.");

REGISTER_OP(kEmbeddingOpName)
    .Input("labels: Tlabels")
    .Input("embeddings_a: T")
    .Input("embeddings_b: T")
    .Input("margin: double")
    .Output("loss: T")
    .Output("row_coefficients: double")
    .Attr(kLabelTypes)
    .Attr(kDistanceTypes)
    .Attr(kDistanceAttr)
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings, rows, coefficients;
      TF_RETURN_IF_ERROR(EmbeddingShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(NumCoefficients(c)), &coefficients));
      c->set_output(0, rows);
      c->set_output(1, coefficients);
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
    .Attr(kDistanceTypes)
    .Attr(kDistanceAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &embeddings));
      c->set_output(0, embeddings);
      c->set_output(1, embeddings);
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
    .Attr(kLabelTypes)
    .Attr(kDistanceTypes)
    .Attr(kDistanceAttr)
    .Attr("reduction: {'sum', 'mean', 'weighted_mean'}")
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings, rows;
      TF_RETURN_IF_ERROR(EmbeddingShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(PerRowWeights(c, 3, rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      TF_RETURN_IF_ERROR(RequireScalar(c, 5));
      c->set_output(0, c->Scalar());
      c->set_output(1, embeddings);
      c->set_output(2, embeddings);
      c->set_output(3, c->Scalar());
      return absl::OkStatus();
    })
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
    .Attr(kLabelTypes)
    .Attr(kDistanceTypes)
    .Attr(kDistanceAttr)
    .Attr("reduction: {'sum', 'mean', 'weighted_mean'}")
    .Attr(kSimilarLabelAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle pairs, rows;
      TF_RETURN_IF_ERROR(PairShapes(c, &pairs, &rows));
      TF_RETURN_IF_ERROR(PerRowWeights(c, 2, rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      c->set_output(0, c->Scalar());
      c->set_output(1, pairs);
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
EmbeddingContrastiveLossReduced on the two embeddings of each pair stacked on
axis -2, pairs [..., 2, D] (a = pairs[..., 0, :], b = pairs[..., 1, :]), read
in place; grad is d(loss)/d(pairs), written in the same layout.
)doc");

REGISTER_OP(kInBatchOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
    .Input("margin: double")
    .Input("positive_margin: double")
    .Output("loss: T")
    .Attr(kInBatchTypes)
    .Attr(kInBatchDistanceAttr)
    .Attr(kPairWeightingAttr)
    .Attr(kMaxBlockRowsAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings, rows;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(RequireScalar(c, 2));
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      c->set_output(0, rows);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Per-anchor contrastive loss over every ordered pair (i, j), j != i, of a batch
of embeddings [B, D] with class labels [B] (equal labels: positive pair),
computed in blocks of rows (at most max_block_rows; 0: the kernel's choice)
without ever holding a B x B matrix.
)doc");

REGISTER_OP(kInBatchGradOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
    .Input("upstream: T")
    .Input("margin: double")
    .Input("positive_margin: double")
    .Output("grad: T")
    .Attr(kInBatchTypes)
    .Attr(kInBatchDistanceAttr)
    .Attr(kPairWeightingAttr)
    .Attr(kMaxBlockRowsAttr)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings, rows, unused;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      TF_RETURN_IF_ERROR(c->Merge(c->input(2), rows, &unused));
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      c->set_output(0, embeddings);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of sum(upstream * InBatchContrastiveLoss) with respect to the
embeddings, from one sweep over the pairs.
)doc");

REGISTER_OP(kInBatchReducedOpName)
    .Input("labels: int64")
    .Input("embeddings: T")
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
    .Attr("reduction: {'sum', 'mean', 'weighted_mean'}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle embeddings, rows;
      TF_RETURN_IF_ERROR(InBatchShapes(c, &embeddings, &rows));
      ShapeHandle weights = c->input(2);
      if (c->RankKnown(weights) && c->Rank(weights) != 0) {
        ShapeHandle unused;
        if (!c->Merge(rows, weights, &unused).ok()) {
          return ShapeMismatch("sample_weight", c->DebugString(rows), c->DebugString(weights));
        }
      }
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      TF_RETURN_IF_ERROR(RequireScalar(c, 5));
      c->set_output(0, c->Scalar());
      c->set_output(1, embeddings);
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
InBatchContrastiveLoss reduced as ContrastiveLossReduced reduces (sample
weights per anchor), and the gradient of the reduced loss with respect to the
embeddings, from one sweep over the pairs.
)doc");

}  // namespace fused_contrastive
