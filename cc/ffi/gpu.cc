// The CUDA handlers of JAX's targets (ffi/targets.h): the kernels' CUDA entries
// on the stream XLA hands the call, with the scratch XLA allocates. Their
// operands and attrs are the host handlers' (ffi/args.h), so one
// jax.ffi.ffi_call lowers to either platform. The in-batch GEMMs are the
// kernels' own tiled ones (TiledGemmGpu): JAX brings no cuBLAS handle.
// Built into _kernels with CUDA only; TensorFlow's XLA lowers its GPU graphs
// to HLO instead (tf/xla).
#include <cstdint>
#include <optional>
#include <string>

#include "core/distances/kernels.h"
#include "core/in_batch/kernels.h"
#include "core/pairs/kernels.h"
#include "ffi/args.h"
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {
namespace {

ffi::Error FromGpu(GpuStatus status) {
  if (status.ok()) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("contrastive loss on CUDA: ") + status.error);
}

ffi::Error LossCuda(void* stream, ffi::AnyBuffer labels, ffi::AnyBuffer distances,
                    ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad,
                    double margin, int32_t similar_label) {
  LossInputs in;
  ffi::Error error = ReadLossInputs(labels, distances, margin, similar_label, &in);
  if (!error.success()) return error;
  return FromGpu(ContrastiveLossGpu(in, loss->untyped_data(), grad->untyped_data(), stream));
}

ffi::Error EmbeddingLossOnRowsCuda(void* stream, ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                                   PairRows rows, ffi::Result<ffi::AnyBuffer> loss,
                                   ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                                   int32_t distance, int32_t similar_label) {
  EmbeddingInputs in;
  bool margin_valid;
  if (!ReadEmbeddingInputs(labels, embeddings, rows, margin, similar_label, distance, &in,
                           &margin_valid) ||
      !margin_valid || !CoefficientsFit(*coefficients, in.rows, in.distance)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "contrastive loss: unsupported dtypes, an invalid margin, or coefficients "
                      "of the wrong size");
  }
  return FromGpu(EmbeddingLossGpu(in, loss->untyped_data(),
                                  static_cast<double*>(coefficients->untyped_data()), stream));
}

ffi::Error EmbeddingLossCuda(void* stream, ffi::AnyBuffer labels, ffi::AnyBuffer a,
                             ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> loss,
                             ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                             int32_t distance, int32_t similar_label) {
  return EmbeddingLossOnRowsCuda(stream, labels, a, SeparateRows(a, b), loss, coefficients, margin,
                                 distance, similar_label);
}

ffi::Error EmbeddingPairLossCuda(void* stream, ffi::AnyBuffer labels, ffi::AnyBuffer pairs,
                                 ffi::Result<ffi::AnyBuffer> loss,
                                 ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                                 int32_t distance, int32_t similar_label) {
  return EmbeddingLossOnRowsCuda(stream, labels, pairs, StackedRows(pairs, pairs.untyped_data()),
                                 loss, coefficients, margin, distance, similar_label);
}

ffi::Error EmbeddingGradOnRowsCuda(void* stream, ffi::AnyBuffer embeddings, PairRows rows,
                                   PairRows grads, ffi::AnyBuffer coefficients,
                                   ffi::AnyBuffer upstream, int32_t distance) {
  EmbeddingGradArgs args;
  ffi::Error error =
      ReadEmbeddingGradArgs(embeddings, rows, grads, coefficients, upstream, distance, &args);
  if (!error.success()) return error;
  return FromGpu(EmbeddingGradGpu(args, stream));
}

ffi::Error EmbeddingGradCuda(void* stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                             ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                             ffi::Result<ffi::AnyBuffer> grad_a, ffi::Result<ffi::AnyBuffer> grad_b,
                             int32_t distance) {
  return EmbeddingGradOnRowsCuda(stream, a, SeparateRows(a, b), SeparateRows(*grad_a, *grad_b),
                                 coefficients, upstream, distance);
}

ffi::Error EmbeddingPairGradCuda(void* stream, ffi::AnyBuffer pairs, ffi::AnyBuffer coefficients,
                                 ffi::AnyBuffer upstream, ffi::Result<ffi::AnyBuffer> grad,
                                 int32_t distance) {
  return EmbeddingGradOnRowsCuda(stream, pairs, StackedRows(pairs, pairs.untyped_data()),
                                 StackedRows(pairs, grad->untyped_data()), coefficients, upstream,
                                 distance);
}

// The loss (upstream null) or the gradient and the loss.
ffi::Error InBatchCuda(void* stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer labels,
                       ffi::AnyBuffer embeddings, const void* upstream, void* grad, void* loss,
                       double margin, double positive_margin, int32_t distance,
                       int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                       int32_t miner_epsilon_bits, int64_t anchors) {
  InBatchArgs args;
  ffi::Error error = ReadJaxInBatchArgs(labels, embeddings, upstream, grad, loss, margin,
                                        positive_margin, distance, pair_weighting, max_block_rows,
                                        miner, miner_epsilon_bits, anchors, &args);
  if (!error.success()) return error;
  const int64_t bytes = InBatchLossGpuWorkspace(args);
  std::optional<void*> workspace = bytes > 0 ? scratch.Allocate(bytes) : nullptr;
  if (!workspace.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "in-batch contrastive loss: no device memory for its workspace of " +
                          std::to_string(bytes) + " bytes");
  }
  return FromGpu(InBatchLossGpu(args, *workspace, TiledGemmGpu(args.type, stream), stream));
}

ffi::Error InBatchLossJaxCuda(void* stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer labels,
                              ffi::AnyBuffer embeddings, ffi::Result<ffi::AnyBuffer> loss,
                              double margin, double positive_margin, int32_t distance,
                              int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                              int32_t miner_epsilon_bits, int64_t anchors) {
  return InBatchCuda(stream, scratch, labels, embeddings, nullptr, nullptr, loss->untyped_data(),
                     margin, positive_margin, distance, pair_weighting, max_block_rows, miner,
                     miner_epsilon_bits, anchors);
}

ffi::Error InBatchGradJaxCuda(void* stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer labels,
                              ffi::AnyBuffer embeddings, ffi::AnyBuffer upstream,
                              ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> loss,
                              double margin, double positive_margin, int32_t distance,
                              int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                              int32_t miner_epsilon_bits, int64_t anchors) {
  return InBatchCuda(stream, scratch, labels, embeddings, upstream.untyped_data(),
                     grad->untyped_data(), loss->untyped_data(), margin, positive_margin, distance,
                     pair_weighting, max_block_rows, miner, miner_epsilon_bits, anchors);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveLossCuda, LossCuda,
                              LossBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveEmbeddingLossJaxCuda, EmbeddingLossCuda,
                              EmbeddingLossJaxBinding</*kStacked=*/false>(
                                  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingPairLossJaxCuda, EmbeddingPairLossCuda,
    EmbeddingLossJaxBinding</*kStacked=*/true>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingLossGradCuda, EmbeddingGradCuda,
    EmbeddingGradBinding</*kStacked=*/false>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingPairLossGradCuda, EmbeddingPairGradCuda,
    EmbeddingGradBinding</*kStacked=*/true>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossJaxCuda, InBatchLossJaxCuda,
                              InBatchLossJaxBinding(ffi::Ffi::Bind()
                                                        .Ctx<ffi::PlatformStream<void*>>()
                                                        .Ctx<ffi::ScratchAllocator>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossGradJaxCuda, InBatchGradJaxCuda,
                              InBatchGradJaxBinding(ffi::Ffi::Bind()
                                                        .Ctx<ffi::PlatformStream<void*>>()
                                                        .Ctx<ffi::ScratchAllocator>()));

}  // namespace fused_contrastive
