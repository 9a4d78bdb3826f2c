// The in-batch all-pairs loss's typed-FFI handlers (ffi/targets.h): they run
// InBatchLossCpu and InBatchLossReducedCpu for the custom calls
// tf/xla/in_batch.cc emits on XLA's CPU backend and JAX's front end makes.
// Operands and results are the TF ops' inputs and outputs in order
// (tf/in_batch.h): labels int64 [B], embeddings [B, D], anchors int64 [4],
// upstream [B], sample_weight [A] or scalar, margins and loss_scale float64
// scalars.
#include <cstdint>
#include <cstring>
#include <string>

#include "core/in_batch/kernels.h"
#include "ffi/host.h"
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {
namespace {

// The handlers' labels, embeddings [B, D], margins and attrs; false for an
// unsupported dtype. The kernels need valid margins: invalid run-time ones
// are passed as 0 and *margins_valid is false, for the caller to make its
// results NaN (the rule of CheckConstantMargin).
bool ReadInBatchHostInputs(ffi::BufferR1<ffi::S64> labels, ffi::AnyBuffer embeddings,
                           ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> positive_margin,
                           int32_t distance, int32_t pair_weighting, int32_t max_block_rows,
                           int32_t miner, int32_t miner_epsilon_bits, InBatchArgs* args,
                           bool* margins_valid) {
  const double margin_value = margin.typed_data()[0];
  const double positive_margin_value = positive_margin.typed_data()[0];
  *margins_valid = IsValidMargin(margin_value) && IsValidMargin(positive_margin_value);
  args->labels = labels.typed_data();
  args->embeddings = embeddings.untyped_data();
  args->rows = embeddings.dimensions()[0];
  args->dim = embeddings.dimensions()[1];
  args->margin = *margins_valid ? margin_value : 0.0;
  args->positive_margin = *margins_valid ? positive_margin_value : 0.0;
  args->distance = static_cast<Distance>(distance);
  args->weighting = static_cast<PairWeighting>(pair_weighting);
  args->miner = static_cast<Miner>(miner);
  float epsilon;
  std::memcpy(&epsilon, &miner_epsilon_bits, sizeof(epsilon));
  args->miner_epsilon = epsilon;
  args->max_block_rows = max_block_rows;
  args->upstream = nullptr;
  args->loss = nullptr;
  args->grad = nullptr;
  return FromFfi(embeddings.element_type(), &args->type) && IsInBatchDType(args->type);
}

// The anchor range, known only now: a bad one is an error of the call.
ffi::Error ReadAnchors(ffi::BufferR1<ffi::S64> anchors, InBatchArgs* args) {
  const std::string problem = SetInBatchAnchors(anchors.typed_data(), args);
  if (problem.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "in-batch contrastive loss: " + problem);
}

ffi::Error InBatchLossHost(ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels,
                           ffi::AnyBuffer embeddings, ffi::BufferR1<ffi::S64> anchors,
                           ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> loss, int32_t distance,
                           int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                           int32_t miner_epsilon_bits) {
  InBatchArgs args;
  bool margins_valid;
  const bool read =
      ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance, pair_weighting,
                            max_block_rows, miner, miner_epsilon_bits, &args, &margins_valid);
  ffi::Error error = ReadAnchors(anchors, &args);
  if (!error.success()) return error;
  args.loss = loss->untyped_data();
  error = RunHostKernel(pool, read, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  if (error.success() && !margins_valid) FillNan(*loss);
  return error;
}

ffi::Error InBatchGradHost(ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels,
                           ffi::AnyBuffer embeddings, ffi::BufferR1<ffi::S64> anchors,
                           ffi::AnyBuffer upstream, ffi::BufferR0<ffi::F64> margin,
                           ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> loss,
                           int32_t distance, int32_t pair_weighting, int32_t max_block_rows,
                           int32_t miner, int32_t miner_epsilon_bits) {
  InBatchArgs args;
  bool margins_valid;
  const bool read =
      ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance, pair_weighting,
                            max_block_rows, miner, miner_epsilon_bits, &args, &margins_valid);
  ffi::Error error = ReadAnchors(anchors, &args);
  if (!error.success()) return error;
  args.upstream = upstream.untyped_data();
  args.grad = grad->untyped_data();
  args.loss = loss->untyped_data();
  error = RunHostKernel(pool, read, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
  if (error.success() && !margins_valid) {
    FillNan(*grad);
    FillNan(*loss);
  }
  return error;
}

ffi::Error InBatchLossReducedHost(
    ffi::ThreadPool pool, ffi::BufferR1<ffi::S64> labels, ffi::AnyBuffer embeddings,
    ffi::BufferR1<ffi::S64> anchors, ffi::AnyBuffer weights, ffi::BufferR0<ffi::F64> margin,
    ffi::BufferR0<ffi::F64> positive_margin, ffi::BufferR0<ffi::F64> loss_scale,
    ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad,
    ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t distance, int32_t pair_weighting,
    int32_t max_block_rows, int32_t miner, int32_t miner_epsilon_bits, int32_t reduction) {
  InBatchReducedArgs args;
  bool margins_valid;
  const bool read =
      ReadInBatchHostInputs(labels, embeddings, margin, positive_margin, distance, pair_weighting,
                            max_block_rows, miner, miner_epsilon_bits, &args.in, &margins_valid);
  ffi::Error error = ReadAnchors(anchors, &args.in);
  if (!error.success()) return error;
  const int64_t anchor_count = args.in.anchor_end - args.in.anchor_begin;
  if (weights.dimensions().size() == 1 && weights.dimensions()[0] != anchor_count) {
    return ffi::Error(
        ffi::ErrorCode::kInvalidArgument,
        "in-batch contrastive loss: sample_weight must be a scalar or one per anchor (" +
            std::to_string(anchor_count) + "), got " + std::to_string(weights.dimensions()[0]));
  }
  args.reduction = HostReduction(weights, loss_scale, loss, reduction_scale, reduction);
  args.grad = grad->untyped_data();
  error = RunHostKernel(pool, read,
                        [&](const ParallelFor& p) { return InBatchLossReducedCpu(args, p); });
  // The reduction scale does not depend on the margins: it stays.
  if (error.success() && !margins_valid) {
    FillNan(*loss);
    FillNan(*grad);
  }
  return error;
}

}  // namespace

// C symbols (declared in ffi/targets.h), outside the unnamed namespace.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLoss, InBatchLossHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                                  .Arg<ffi::AnyBuffer>()           // embeddings
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // anchors
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("pair_weighting")
                                  .Attr<int32_t>("max_block_rows")
                                  .Attr<int32_t>("miner")
                                  .Attr<int32_t>("miner_epsilon_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossGrad, InBatchGradHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                                  .Arg<ffi::AnyBuffer>()           // embeddings
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // anchors
                                  .Arg<ffi::AnyBuffer>()           // upstream
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                  .Ret<ffi::AnyBuffer>()           // grad
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("pair_weighting")
                                  .Attr<int32_t>("max_block_rows")
                                  .Attr<int32_t>("miner")
                                  .Attr<int32_t>("miner_epsilon_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossReduced, InBatchLossReducedHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // labels
                                  .Arg<ffi::AnyBuffer>()           // embeddings
                                  .Arg<ffi::BufferR1<ffi::S64>>()  // anchors
                                  .Arg<ffi::AnyBuffer>()           // sample_weight
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Ret<ffi::AnyBuffer>()           // grad
                                  .Ret<ffi::AnyBuffer>()           // reduction_scale
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("pair_weighting")
                                  .Attr<int32_t>("max_block_rows")
                                  .Attr<int32_t>("miner")
                                  .Attr<int32_t>("miner_epsilon_bits")
                                  .Attr<int32_t>("reduction"));

}  // namespace fused_contrastive
