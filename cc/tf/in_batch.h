// The in-batch all-pairs loss (InBatchContrastiveLoss, its Grad and Reduced
// ops) as its op definitions, OpKernels, XLA lowerings and host calls share
// it: the ops' inputs and outputs by name, attrs and shape rules.
#ifndef FUSED_CONTRASTIVE_TF_IN_BATCH_H_
#define FUSED_CONTRASTIVE_TF_IN_BATCH_H_

#include <cstdint>
#include <string>

#include "core/in_batch/kernels.h"
#include "ffi/targets.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/names.h"
#include "tf/registry.h"

namespace fused_contrastive {

// Positions in the order of the op definitions (ops/in_batch.cc). The host
// calls (ffi/in_batch.cc) take the inputs as operands and give the
// outputs as results in the same order.
struct InBatchLossIo {
  enum Input { kLabels, kEmbeddings, kAnchors, kMargin, kPositiveMargin };
  enum Output { kLoss };
};

struct InBatchGradIo {
  enum Input { kLabels, kEmbeddings, kAnchors, kUpstream, kMargin, kPositiveMargin };
  enum Output { kGrad, kLoss };
};

struct InBatchReducedIo {
  enum Input { kLabels, kEmbeddings, kAnchors, kWeights, kMargin, kPositiveMargin, kLossScale };
  enum Output { kLoss, kGrad, kReductionScale };
};

// The attrs all three ops have.
struct InBatchAttrs {
  Distance distance;
  PairWeighting weighting;
  int64_t max_block_rows;
  Miner miner;
  float miner_epsilon;  // a float attr: Python rounds it to float32 on every path
};

inline absl::Status ReadInBatchAttrs(tensorflow::OpKernelConstruction* ctx, InBatchAttrs* attrs) {
  TF_RETURN_IF_ERROR(ReadDistance(ctx, &attrs->distance));
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("pair_weighting", &name));
  if (!ParsePairWeighting(name, &attrs->weighting)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown pair_weighting ", name));
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("miner", &name));
  if (!ParseMiner(name, &attrs->miner)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown miner ", name));
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("miner_epsilon", &attrs->miner_epsilon));
  return ctx->GetAttr("max_block_rows", &attrs->max_block_rows);
}

// Embeddings [B, D] against labels [B].
inline absl::Status InBatchShapeMismatch(const std::string& labels, const std::string& embeddings) {
  return absl::InvalidArgumentError(absl::StrCat(
      "in-batch contrastive loss: embeddings must have shape [B, D] and labels [B]; got labels ",
      labels, " and embeddings ", embeddings));
}

// The rule of the shape functions (ops/in_batch.cc) on known shapes.
inline absl::Status CheckInBatchShapes(const tensorflow::TensorShape& labels,
                                       const tensorflow::TensorShape& embeddings) {
  if (embeddings.dims() == 2 && labels.dims() == 1 &&
      labels.dim_size(0) == embeddings.dim_size(0)) {
    return absl::OkStatus();
  }
  return InBatchShapeMismatch(labels.DebugString(), embeddings.DebugString());
}

// The anchors input: int64 [begin, end, grad, used] (InBatchArgs).
inline constexpr int kInBatchAnchorValues = 4;

inline absl::Status InBatchAnchorsShapeError(const std::string& shape) {
  return absl::InvalidArgumentError(absl::StrCat(
      "in-batch contrastive loss: anchors must be [begin, end, grad, used] (shape [4]), got "
      "shape ",
      shape));
}

inline absl::Status CheckInBatchAnchors(const tensorflow::TensorShape& shape) {
  if (shape == tensorflow::TensorShape({kInBatchAnchorValues})) return absl::OkStatus();
  return InBatchAnchorsShapeError(shape.DebugString());
}

// The anchors input's values into args (rows set), checked.
inline absl::Status CheckedInBatchAnchors(const int64_t* values, InBatchArgs* args) {
  const std::string problem = SetInBatchAnchors(values, args);
  if (problem.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("in-batch contrastive loss: ", problem));
}

// The reduced op's sample_weight: a scalar or one per anchor. `anchors` is
// their count, or -1 where it is known only at run time (then at most the
// rows).
inline absl::Status CheckInBatchWeights(const tensorflow::TensorShape& weights, int64_t anchors,
                                        int64_t rows) {
  if (weights.dims() == 0 ||
      (weights.dims() == 1 &&
       (anchors < 0 ? weights.dim_size(0) <= rows : weights.dim_size(0) == anchors))) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "in-batch contrastive loss: sample_weight must be a scalar or one weight per anchor (",
      anchors < 0 ? absl::StrCat("at most ", rows) : absl::StrCat(anchors), "), got shape ",
      weights.DebugString()));
}

// The grad op's upstream: of the labels' shape.
inline absl::Status CheckInBatchUpstream(const tensorflow::TensorShape& labels,
                                         const tensorflow::TensorShape& upstream) {
  if (upstream == labels) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("in-batch contrastive loss: upstream must have the labels' shape ",
                   labels.DebugString(), ", got ", upstream.DebugString()));
}

// For the registration table: kernels/in_batch.cc and xla/in_batch.cc.
extern const OpKernels kInBatchLossKernels;
extern const OpKernels kInBatchGradKernels;
extern const OpKernels kInBatchReducedKernels;
extern const XlaKernels kInBatchLossXla;
extern const XlaKernels kInBatchGradXla;
extern const XlaKernels kInBatchReducedXla;

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_IN_BATCH_H_
