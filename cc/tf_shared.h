// What the op definitions, the OpKernels and the XLA lowerings share: the ops'
// names and attrs, the mapping between our DType and TensorFlow's DataType,
// the errors they report, and kernel registration.
#ifndef FUSED_CONTRASTIVE_TF_SHARED_H_
#define FUSED_CONTRASTIVE_TF_SHARED_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/distances/kernels.h"
#include "core/common/dtypes.h"
#include "core/pairs/math.h"
#include "core/in_batch/kernels.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/op_kernel.h"
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

// The attr lists of the op definitions, spelled from kAllDTypes and the
// predicates of dtypes.h and in_batch_kernels.h, so that the supported dtypes
// are written once.
inline std::string TypeListAttr(const char* name, bool (*supported)(DType)) {
  std::string list;
  for (DType t : kAllDTypes) {
    if (!supported(t)) continue;
    absl::StrAppend(&list, list.empty() ? "" : ", ", tensorflow::DataTypeString(ToTf(t)));
  }
  return absl::StrCat(name, ": {", list, "}");
}

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

// The reduced op's "reduction" attr.
inline absl::Status ReadReduction(tensorflow::OpKernelConstruction* ctx,
                                  Reduction* reduction) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("reduction", &name));
  if (!ParseReduction(name, reduction)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown reduction ", name));
  }
  return absl::OkStatus();
}

// The loss ops' "similar_label" attr: 1 (TF Addons) or 0 (Hadsell, keras.io).
inline absl::Status ReadSimilarLabel(tensorflow::OpKernelConstruction* ctx, int* similar_label) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("similar_label", similar_label));
  if (!IsValidSimilarLabel(*similar_label)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "contrastive loss: similar_label must be 0 or 1, got ", *similar_label));
  }
  return absl::OkStatus();
}

// A string attr's allowed values, spelled from the C++ names.
template <typename Value, size_t N>
std::string NamesAttr(const char* attr, const Value (&values)[N],
                      const char* (*name)(Value)) {
  std::string list;
  for (Value v : values) absl::StrAppend(&list, list.empty() ? "'" : ", '", name(v), "'");
  return absl::StrCat(attr, ": {", list, "}");
}

// The embedding ops' "distance" attr, spelled from kAllDistances.
inline std::string DistanceAttr() { return NamesAttr("distance", kAllDistances, DistanceName); }

inline absl::Status ReadDistance(tensorflow::OpKernelConstruction* ctx, Distance* distance) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("distance", &name));
  if (!ParseDistance(name, distance)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown distance ", name));
  }
  return absl::OkStatus();
}

// Embeddings [..., D] against labels [...]: the shape error all embedding
// kernels report.
inline absl::Status EmbeddingShapeMismatch(const std::string& labels, const std::string& a,
                                           const std::string& b) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss from embeddings: embeddings_a and embeddings_b must have the same shape "
      "[..., D] with D >= 1, and labels their shape without the last axis; got labels ",
      labels, ", embeddings_a ", a, " and embeddings_b ", b));
}

// The stacked-pair op's shape error: pairs [..., 2, D] and labels [...].
inline absl::Status PairShapeMismatch(const std::string& labels, const std::string& pairs) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss from embeddings: the stacked pairs must have shape [..., 2, D] with "
      "D >= 1, and labels their shape without the last two axes; got labels ",
      labels, " and pairs ", pairs));
}

// The same check on known shapes (the OpKernels, the XLA lowerings).
inline absl::Status CheckPairShapes(const tensorflow::TensorShape& labels,
                                    const tensorflow::TensorShape& pairs) {
  tensorflow::TensorShape rows = pairs;
  if (pairs.dims() >= 2 && pairs.dim_size(pairs.dims() - 2) == 2 &&
      pairs.dim_size(pairs.dims() - 1) >= 1 && rows.RemoveLastDimsWithStatus(2).ok() &&
      labels == rows) {
    return absl::OkStatus();
  }
  return PairShapeMismatch(labels.DebugString(), pairs.DebugString());
}

// The in-batch ops' shape error: embeddings [B, D] and labels [B].
inline absl::Status InBatchShapeMismatch(const std::string& labels,
                                         const std::string& embeddings) {
  return absl::InvalidArgumentError(absl::StrCat(
      "in-batch contrastive loss: embeddings must have shape [B, D] and labels [B]; got labels ",
      labels, " and embeddings ", embeddings));
}

// The same check on known shapes (the OpKernels, the XLA lowerings).
inline absl::Status CheckInBatchShapes(const tensorflow::TensorShape& labels,
                                       const tensorflow::TensorShape& embeddings) {
  if (embeddings.dims() == 2 && labels.dims() == 1 &&
      labels.dim_size(0) == embeddings.dim_size(0)) {
    return absl::OkStatus();
  }
  return InBatchShapeMismatch(labels.DebugString(), embeddings.DebugString());
}

// A per-row input of the embedding ops (sample weights, upstream gradients):
// a scalar or of the labels' shape `rows`.
inline absl::Status CheckPerRow(const char* what, const tensorflow::TensorShape& shape,
                                const tensorflow::TensorShape& rows) {
  if (shape.dims() == 0 || shape == rows) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("contrastive loss from embeddings: ", what,
                                                 " must be a scalar or of shape ",
                                                 rows.DebugString(), ", got ",
                                                 shape.DebugString()));
}

// The grad op's row_coefficients: `rows` plus one axis of the distance's
// coefficient count.
inline absl::Status CheckRowCoefficients(const tensorflow::TensorShape& shape,
                                         const tensorflow::TensorShape& rows,
                                         Distance distance) {
  tensorflow::TensorShape expected = rows;
  expected.AddDim(NumRowCoefficients(distance));
  if (shape == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss from embeddings: row_coefficients must have shape ",
      expected.DebugString(), ", got ", shape.DebugString()));
}

// The in-batch ops' attrs.
inline absl::Status ReadInBatchAttrs(tensorflow::OpKernelConstruction* ctx, Distance* distance,
                                     PairWeighting* weighting, int64_t* max_block_rows) {
  TF_RETURN_IF_ERROR(ReadDistance(ctx, distance));
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("pair_weighting", &name));
  if (!ParsePairWeighting(name, weighting)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown pair_weighting ", name));
  }
  return ctx->GetAttr("max_block_rows", max_block_rows);
}

template <typename Kernel>
tensorflow::OpKernel* CreateKernel(tensorflow::OpKernelConstruction* ctx) {
  return new Kernel(ctx);
}

// Registers Kernel for `op` on `device_type` (CPU, GPU or an XLA JIT device),
// one KernelDef per supported distance dtype, times every label dtype when the
// op has typed labels. Registering each pair explicitly keeps TensorFlow's
// kernel registry an honest list of what runs where.
template <typename Kernel>
void RegisterKernels(const char* op, const char* device_type, const char* class_name,
                     bool typed_labels, const std::vector<const char*>& host_memory,
                     bool (*value_types)(DType) = IsDistanceDType) {
  for (DType distance : kAllDTypes) {
    if (!value_types(distance)) continue;
    for (DType label : kAllDTypes) {
      tensorflow::KernelDefBuilder builder(op);
      builder.Device(device_type).TypeConstraint("T", ToTf(distance));
      if (typed_labels) builder.TypeConstraint("Tlabels", ToTf(label));
      for (const char* arg : host_memory) builder.HostMemory(arg);
      // The registrar copies what it keeps; it need not outlive this call.
      tensorflow::kernel_factory::OpKernelRegistrar(builder.Build(), class_name,
                                                    CreateKernel<Kernel>);
      if (!typed_labels) break;
    }
  }
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_SHARED_H_
