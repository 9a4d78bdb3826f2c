// The custom-call targets whose handlers run the CPU kernels: their names
// (TensorFlow's XLA lowerings emit them, JAX's front end calls them) and
// their handlers, exported as C symbols. TensorFlow's XLA registers them at
// load (tf/xla/host_calls.cc); JAX registers them from Python with the
// capsules of the pybind11 module (pybind/ffi.cc). No TensorFlow here.
#ifndef FUSED_CONTRASTIVE_FFI_TARGETS_H_
#define FUSED_CONTRASTIVE_FFI_TARGETS_H_

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* FusedContrastiveLoss(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLoss(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossMarginAttr(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossGrad(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossReduced(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossReduced(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLoss(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossGrad(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossReduced(XLA_FFI_CallFrame* call_frame);
}

namespace fused_contrastive {

inline constexpr char kLossTarget[] = "fused_contrastive_loss";
inline constexpr char kEmbeddingTarget[] = "fused_contrastive_embedding_loss";
inline constexpr char kEmbeddingMarginAttrTarget[] = "fused_contrastive_embedding_loss_margin_attr";
inline constexpr char kEmbeddingGradTarget[] = "fused_contrastive_embedding_loss_grad";
inline constexpr char kEmbeddingReducedTarget[] = "fused_contrastive_embedding_loss_reduced";
inline constexpr char kEmbeddingPairReducedTarget[] =
    "fused_contrastive_embedding_pair_loss_reduced";
inline constexpr char kInBatchTarget[] = "fused_contrastive_in_batch_loss";
inline constexpr char kInBatchGradTarget[] = "fused_contrastive_in_batch_loss_grad";
inline constexpr char kInBatchReducedTarget[] = "fused_contrastive_in_batch_loss_reduced";

struct HostTarget {
  const char* name;
  XLA_FFI_Handler* handler;
};

// Every target, for the registrations.
inline constexpr HostTarget kHostTargets[] = {
    {kLossTarget, FusedContrastiveLoss},
    {kEmbeddingTarget, FusedContrastiveEmbeddingLoss},
    {kEmbeddingMarginAttrTarget, FusedContrastiveEmbeddingLossMarginAttr},
    {kEmbeddingGradTarget, FusedContrastiveEmbeddingLossGrad},
    {kEmbeddingReducedTarget, FusedContrastiveEmbeddingLossReduced},
    {kEmbeddingPairReducedTarget, FusedContrastiveEmbeddingPairLossReduced},
    {kInBatchTarget, FusedContrastiveInBatchLoss},
    {kInBatchGradTarget, FusedContrastiveInBatchLossGrad},
    {kInBatchReducedTarget, FusedContrastiveInBatchLossReduced},
};

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_FFI_TARGETS_H_
