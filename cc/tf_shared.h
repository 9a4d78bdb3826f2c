// What the OpKernels and the XLA lowerings share: the ops' names, the mapping
// between our DType and TensorFlow's DataType, and the errors both report.
#ifndef FUSED_CONTRASTIVE_TF_SHARED_H_
#define FUSED_CONTRASTIVE_TF_SHARED_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "contrastive_kernels.h"
#include "dtypes.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/types.pb.h"

namespace fused_contrastive {

inline constexpr char kOpName[] = "FusedContrastive>ContrastiveLoss";
inline constexpr char kReducedOpName[] = "FusedContrastive>ContrastiveLossReduced";
inline constexpr char kScaleOpName[] = "FusedContrastive>ScaleGradient";

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

inline absl::Status ShapeMismatch(const char* what, const std::string& labels,
                                  const std::string& other) {
  return absl::InvalidArgumentError(absl::StrCat("contrastive loss: labels and ", what,
                                                 " must have the same shape, got labels ", labels,
                                                 " and ", what, " ", other));
}

inline absl::Status CheckMargin(double margin) {
  if (IsValidMargin(margin)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("contrastive loss: margin must be finite and non-negative, got ", margin));
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

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_SHARED_H_
