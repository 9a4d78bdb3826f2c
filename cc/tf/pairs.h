// The loss from pair embeddings (EmbeddingContrastiveLoss, its Grad and
// Reduced ops, EmbeddingPairContrastiveLossReduced) as its op definitions,
// OpKernels, XLA lowerings and host calls share it: the ops' inputs and
// outputs by name, the embedding shape rule and the shape errors.
#ifndef FUSED_CONTRASTIVE_TF_PAIRS_H_
#define FUSED_CONTRASTIVE_TF_PAIRS_H_

#include <string>

#include "core/pairs/math.h"
#include "ffi/targets.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/names.h"
#include "tf/registry.h"

namespace fused_contrastive {

// Positions in the order of the op definitions (ops/pairs.cc). The host calls
// (ffi/pairs.cc) take the inputs as operands and give the outputs
// as results in the same order. kStacked: the embeddings are one stacked pair
// input [..., 2, D] (a = pairs[..., 0, :], b = pairs[..., 1, :]), not a and b;
// kEmbeddings is the first embeddings input, kGrads the first gradient output.
struct EmbeddingLossIo {
  enum Input { kLabels, kA, kB, kMargin };
  enum Output { kLoss, kCoefficients };
  static constexpr bool kStacked = false;
  static constexpr int kEmbeddings = kA;
};

struct EmbeddingGradIo {
  enum Input { kA, kB, kCoefficients, kUpstream };
  enum Output { kGradA, kGradB };
};

struct EmbeddingReducedIo {
  enum Input { kLabels, kA, kB, kWeights, kMargin, kLossScale };
  enum Output { kLoss, kGradA, kGradB, kReductionScale };
  static constexpr bool kStacked = false;
  static constexpr int kEmbeddings = kA;
  static constexpr int kGrads = kGradA;
};

struct EmbeddingPairReducedIo {
  enum Input { kLabels, kPairs, kWeights, kMargin, kLossScale };
  enum Output { kLoss, kGrad, kReductionScale };
  static constexpr bool kStacked = true;
  static constexpr int kEmbeddings = kPairs;
  static constexpr int kGrads = kGrad;
};

// Embeddings [..., D] against labels [...].
inline absl::Status EmbeddingShapeMismatch(const std::string& labels, const std::string& a,
                                           const std::string& b) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss from embeddings: embeddings_a and embeddings_b must have the same shape "
      "[..., D] with D >= 1, and labels their shape without the last axis; got labels ",
      labels, ", embeddings_a ", a, " and embeddings_b ", b));
}

// The stacked pairs [..., 2, D] against labels [...].
inline absl::Status PairShapeMismatch(const std::string& labels, const std::string& pairs) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss from embeddings: the stacked pairs must have shape [..., 2, D] with "
      "D >= 1, and labels their shape without the last two axes; got labels ",
      labels, " and pairs ", pairs));
}

// Labels [...] against embeddings a and b [..., D], or, with `b` null,
// against the stacked pair [..., 2, D] `a`; D >= 1. The rule of the shape
// functions (ops/pairs.cc), on the known shapes of the OpKernels and the XLA
// lowerings.
inline absl::Status CheckEmbeddingShapes(const tensorflow::TensorShape& labels,
                                         const tensorflow::TensorShape& a,
                                         const tensorflow::TensorShape* b) {
  const bool stacked = b == nullptr;
  const int row_axes = a.dims() - (stacked ? 2 : 1);
  tensorflow::TensorShape rows = a;
  if ((stacked || *b == a) && row_axes >= 0 && (!stacked || a.dim_size(row_axes) == 2) &&
      a.dim_size(a.dims() - 1) >= 1 && rows.RemoveLastDimsWithStatus(a.dims() - row_axes).ok() &&
      labels == rows) {
    return absl::OkStatus();
  }
  return stacked ? PairShapeMismatch(labels.DebugString(), a.DebugString())
                 : EmbeddingShapeMismatch(labels.DebugString(), a.DebugString(), b->DebugString());
}

// The grad op's a, b [..., D], row_coefficients ([...] plus an axis of the
// distance's coefficient count) and upstream; *rows: [...].
inline absl::Status CheckGradShapes(const tensorflow::TensorShape& a,
                                    const tensorflow::TensorShape& b,
                                    const tensorflow::TensorShape& coefficients,
                                    const tensorflow::TensorShape& upstream, Distance distance,
                                    tensorflow::TensorShape* rows) {
  if (a != b || a.dims() < 1) {
    return EmbeddingShapeMismatch("(none)", a.DebugString(), b.DebugString());
  }
  *rows = a;
  rows->RemoveLastDims(1);
  tensorflow::TensorShape expected = *rows;
  expected.AddDim(NumRowCoefficients(distance));
  if (coefficients != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("contrastive loss from embeddings: row_coefficients must have shape ",
                     expected.DebugString(), ", got ", coefficients.DebugString()));
  }
  return CheckPerRow("upstream", upstream, *rows);
}

// For the registration table: kernels/pairs.cc and xla/pairs.cc.
extern const OpKernels kEmbeddingLossKernels;
extern const OpKernels kEmbeddingGradKernels;
extern const OpKernels kEmbeddingReducedKernels;
extern const OpKernels kEmbeddingPairReducedKernels;
extern const XlaKernels kEmbeddingLossXla;
extern const XlaKernels kEmbeddingGradXla;
extern const XlaKernels kEmbeddingReducedXla;
extern const XlaKernels kEmbeddingPairReducedXla;

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_PAIRS_H_
