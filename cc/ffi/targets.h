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
XLA_FFI_Error* FusedContrastiveEmbeddingLossJax(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossGrad(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossJax(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossGrad(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossReduced(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossReduced(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLoss(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossGrad(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossReduced(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossJax(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossGradJax(XLA_FFI_CallFrame* call_frame);
// The CUDA handlers of JAX's targets (ffi/gpu.cc; builds of _kernels with
// CUDA only).
XLA_FFI_Error* FusedContrastiveLossCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossJaxCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingLossGradCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossJaxCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveEmbeddingPairLossGradCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossJaxCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FusedContrastiveInBatchLossGradJaxCuda(XLA_FFI_CallFrame* call_frame);
}

namespace fused_contrastive {

inline constexpr char kLossTarget[] = "fused_contrastive_loss";
inline constexpr char kEmbeddingTarget[] = "fused_contrastive_embedding_loss";
inline constexpr char kEmbeddingJaxTarget[] = "fused_contrastive_embedding_loss_jax";
inline constexpr char kEmbeddingGradTarget[] = "fused_contrastive_embedding_loss_grad";
inline constexpr char kEmbeddingPairJaxTarget[] = "fused_contrastive_embedding_pair_loss_jax";
inline constexpr char kEmbeddingPairGradTarget[] = "fused_contrastive_embedding_pair_loss_grad";
inline constexpr char kEmbeddingReducedTarget[] = "fused_contrastive_embedding_loss_reduced";
inline constexpr char kEmbeddingPairReducedTarget[] =
    "fused_contrastive_embedding_pair_loss_reduced";
inline constexpr char kInBatchTarget[] = "fused_contrastive_in_batch_loss";
inline constexpr char kInBatchGradTarget[] = "fused_contrastive_in_batch_loss_grad";
inline constexpr char kInBatchReducedTarget[] = "fused_contrastive_in_batch_loss_reduced";
// JAX's front end calls these (with kLossTarget, kEmbeddingJaxTarget and
// kEmbeddingGradTarget), on the CPU and on CUDA: attrs for what TensorFlow
// passes as run-time scalars (ffi/args.h).
inline constexpr char kInBatchJaxTarget[] = "fused_contrastive_in_batch_loss_jax";
inline constexpr char kInBatchGradJaxTarget[] = "fused_contrastive_in_batch_loss_grad_jax";

struct FfiTarget {
  const char* name;
  XLA_FFI_Handler* handler;
};

// Every host target, for the registrations.
inline constexpr FfiTarget kHostTargets[] = {
    {kLossTarget, FusedContrastiveLoss},
    {kEmbeddingTarget, FusedContrastiveEmbeddingLoss},
    {kEmbeddingJaxTarget, FusedContrastiveEmbeddingLossJax},
    {kEmbeddingGradTarget, FusedContrastiveEmbeddingLossGrad},
    {kEmbeddingPairJaxTarget, FusedContrastiveEmbeddingPairLossJax},
    {kEmbeddingPairGradTarget, FusedContrastiveEmbeddingPairLossGrad},
    {kEmbeddingReducedTarget, FusedContrastiveEmbeddingLossReduced},
    {kEmbeddingPairReducedTarget, FusedContrastiveEmbeddingPairLossReduced},
    {kInBatchTarget, FusedContrastiveInBatchLoss},
    {kInBatchGradTarget, FusedContrastiveInBatchLossGrad},
    {kInBatchReducedTarget, FusedContrastiveInBatchLossReduced},
    {kInBatchJaxTarget, FusedContrastiveInBatchLossJax},
    {kInBatchGradJaxTarget, FusedContrastiveInBatchLossGradJax},
};

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_FFI_TARGETS_H_
