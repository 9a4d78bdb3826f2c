// What the op definitions, OpKernels and XLA lowerings of every family share:
// the ops' names, attr specs and readers, the errors they report, and the
// mapping between our DType and TensorFlow's DataType.
#ifndef FUSED_CONTRASTIVE_TF_NAMES_H_
#define FUSED_CONTRASTIVE_TF_NAMES_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/common/distance.h"
#include "core/common/dtypes.h"
#include "core/common/formula.h"
#include "core/common/reduction.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.pb.h"

namespace fused_contrastive {

inline constexpr char kOpName[] = "FusedContrastive>ContrastiveLoss";
inline constexpr char kReducedOpName[] = "FusedContrastive>ContrastiveLossReduced";
inline constexpr char kScaleOpName[] = "FusedContrastive>ScaleGradient";
inline constexpr char kEmbeddingOpName[] = "FusedContrastive>EmbeddingContrastiveLoss";
inline constexpr char kEmbeddingGradOpName[] = "FusedContrastive>EmbeddingContrastiveLossGrad";
inline constexpr char kEmbeddingReducedOpName[] =
    "FusedContrastive>EmbeddingContrastiveLossReduced";
inline constexpr char kEmbeddingPairReducedOpName[] =
    "FusedContrastive>EmbeddingPairContrastiveLossReduced";
inline constexpr char kInBatchOpName[] = "FusedContrastive>InBatchContrastiveLoss";
inline constexpr char kInBatchGradOpName[] = "FusedContrastive>InBatchContrastiveLossGrad";
inline constexpr char kInBatchReducedOpName[] = "FusedContrastive>InBatchContrastiveLossReduced";

inline tensorflow::DataType ToTf(DType t) {
  switch (t) {
    case DType::kBool: return tensorflow::DT_BOOL;
    case DType::kInt32: return tensorflow::DT_INT32;
    case DType::kInt64: return tensorflow::DT_INT64;
    case DType::kFloat16: return tensorflow::DT_HALF;
    case DType::kBFloat16: return tensorflow::DT_BFLOAT16;
    case DType::kFloat32: return tensorflow::DT_FLOAT;
    case DType::kFloat64: return tensorflow::DT_DOUBLE;
  }
  return tensorflow::DT_INVALID;
}

inline bool FromTf(tensorflow::DataType tf_type, DType* out) {
  for (DType t : kAllDTypes) {
    if (ToTf(t) == tf_type) {
      *out = t;
      return true;
    }
  }
  return false;
}

inline bool AnyDType(DType) { return true; }

// --- Attr specs --------------------------------------------------------------
// Spelled from kAllDTypes, the dtype predicates and the C++ names, so that
// the supported dtypes and names are written once.

inline std::string TypeListAttr(const char* name, bool (*supported)(DType)) {
  std::string list;
  for (DType t : kAllDTypes) {
    if (!supported(t)) continue;
    absl::StrAppend(&list, list.empty() ? "" : ", ", tensorflow::DataTypeString(ToTf(t)));
  }
  return absl::StrCat(name, ": {", list, "}");
}

// A string attr's allowed values.
template <typename Value, size_t N>
std::string NamesAttr(const char* attr, const Value (&values)[N], const char* (*name)(Value)) {
  std::string list;
  for (Value v : values) absl::StrAppend(&list, list.empty() ? "'" : ", '", name(v), "'");
  return absl::StrCat(attr, ": {", list, "}");
}

inline std::string LabelTypesAttr() { return TypeListAttr("Tlabels", AnyDType); }
inline std::string DistanceTypesAttr() { return TypeListAttr("T", IsDistanceDType); }
inline std::string DistanceAttr() { return NamesAttr("distance", kAllDistances, DistanceName); }
inline constexpr char kSimilarLabelAttr[] = "similar_label: int = 1";
inline constexpr char kReductionAttr[] = "reduction: {'sum', 'mean', 'weighted_mean'}";

// --- Attr readers ------------------------------------------------------------

inline absl::Status ReadReduction(tensorflow::OpKernelConstruction* ctx, Reduction* reduction) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("reduction", &name));
  if (!ParseReduction(name, reduction)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown reduction ", name));
  }
  return absl::OkStatus();
}

// similar_label: 1 (TF Addons) or 0 (Hadsell, keras.io).
inline absl::Status ReadSimilarLabel(tensorflow::OpKernelConstruction* ctx, int* similar_label) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("similar_label", similar_label));
  if (!IsValidSimilarLabel(*similar_label)) {
    return absl::InvalidArgumentError(
        absl::StrCat("contrastive loss: similar_label must be 0 or 1, got ", *similar_label));
  }
  return absl::OkStatus();
}

inline absl::Status ReadDistance(tensorflow::OpKernelConstruction* ctx, Distance* distance) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("distance", &name));
  if (!ParseDistance(name, distance)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown distance ", name));
  }
  return absl::OkStatus();
}

// --- Errors ------------------------------------------------------------------

inline absl::Status ShapeMismatch(const char* what, const std::string& labels,
                                  const std::string& other) {
  return absl::InvalidArgumentError(absl::StrCat("contrastive loss: labels and ", what,
                                                 " must have the same shape, got labels ", labels,
                                                 " and ", what, " ", other));
}

inline absl::Status CheckMargin(double margin, const char* what = "margin") {
  if (IsValidMargin(margin)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("contrastive loss: ", what, " must be finite and non-negative, got ", margin));
}

// A per-row input of the embedding and in-batch ops (sample weights, upstream
// gradients): a scalar or of the labels' shape `rows`.
inline absl::Status CheckPerRow(const char* what, const tensorflow::TensorShape& shape,
                                const tensorflow::TensorShape& rows) {
  if (shape.dims() == 0 || shape == rows) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("contrastive loss from embeddings: ", what, " must be a scalar or of shape ",
                   rows.DebugString(), ", got ", shape.DebugString()));
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_NAMES_H_
