// The ops' names and the mapping between our DType and TensorFlow's DataType,
// shared by the OpKernels and the XLA lowering.
#ifndef FUSED_CONTRASTIVE_TF_DTYPES_H_
#define FUSED_CONTRASTIVE_TF_DTYPES_H_

#include "dtypes.h"
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

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_DTYPES_H_
