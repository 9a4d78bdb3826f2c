// The in-batch all-pairs loss's typed-FFI handlers (ffi/targets.h): they run
// InBatchLossCpu and InBatchLossReducedCpu for the custom calls
// tf/xla/in_batch.cc emits on XLA's CPU backend and JAX's front end makes.
// Operands and results are the TF ops' inputs and outputs in order
// (tf/in_batch.h): labels int64 [B], embeddings [B, D], anchors int64 [4],
// upstream [B], sample_weight [A] or scalar, margins and loss_scale float64
// scalars. JAX's front end calls the _jax bindings (ffi/args.h).
#include <cstdint>
#include <cstring>
#include <string>

#include "core/in_batch/kernels.h"
#include "ffi/args.h"
#include "ffi/host.h"
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {
namespace {

// The attrs every in-batch handler takes. miner_epsilon_bits: the float32
// bits of epsilon (TensorFlow's float attr; JAX passes the same value).
void SetInBatchAttrs(int32_t distance, int32_t pair_weighting, int32_t max_block_rows,
                     int32_t miner, int32_t miner_epsilon_bits, InBatchArgs* args) {
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
}

// What a handler reads from its operands: the kernels' args (labels,
// embeddings [B, D], anchors, margins, attrs), whether
// the kernels take the dtype, and whether the margins are valid. The kernels
// need valid margins: invalid run-time ones are passed as 0, for the caller
// to make its results NaN (the rule of CheckConstantMargin).
struct HostInputs {
  InBatchArgs args;
  bool supported = false;
  bool margins_valid = false;
};

// A bad labels or anchors dtype, or a bad anchor range (known only now), is
// an error of the call.
ffi::Error ReadInBatchHostInputs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                                 ffi::AnyBuffer anchors, ffi::BufferR0<ffi::F64> margin,
                                 ffi::BufferR0<ffi::F64> positive_margin, int32_t distance,
                                 int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                                 int32_t miner_epsilon_bits, HostInputs* in) {
  InBatchArgs& args = in->args;
  const double margin_value = margin.typed_data()[0];
  const double positive_margin_value = positive_margin.typed_data()[0];
  in->margins_valid = IsValidMargin(margin_value) && IsValidMargin(positive_margin_value);
  args.embeddings = embeddings.untyped_data();
  args.rows = embeddings.dimensions()[0];
  args.dim = embeddings.dimensions()[1];
  args.margin = in->margins_valid ? margin_value : 0.0;
  args.positive_margin = in->margins_valid ? positive_margin_value : 0.0;
  SetInBatchAttrs(distance, pair_weighting, max_block_rows, miner, miner_epsilon_bits, &args);
  in->supported = FromFfi(embeddings.element_type(), &args.type) && IsInBatchDType(args.type);
  if (labels.element_type() != ffi::DataType::S64 || anchors.element_type() != ffi::DataType::S64 ||
      anchors.element_count() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "in-batch contrastive loss: labels must be int64, and anchors four of them");
  }
  args.labels = static_cast<const int64_t*>(labels.untyped_data());
  const auto* anchor_values = static_cast<const int64_t*>(anchors.untyped_data());
  const std::string problem = SetInBatchAnchors(anchor_values, &args);
  if (problem.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "in-batch contrastive loss: " + problem);
}

ffi::Error InBatchLossHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                           ffi::AnyBuffer anchors, ffi::BufferR0<ffi::F64> margin,
                           ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> loss, int32_t distance,
                           int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                           int32_t miner_epsilon_bits) {
  HostInputs in;
  ffi::Error error =
      ReadInBatchHostInputs(labels, embeddings, anchors, margin, positive_margin, distance,
                            pair_weighting, max_block_rows, miner, miner_epsilon_bits, &in);
  if (!error.success()) return error;
  in.args.loss = loss->untyped_data();
  error = RunHostKernel(pool, in.supported,
                        [&](const ParallelFor& p) { return InBatchLossCpu(in.args, p); });
  if (error.success() && !in.margins_valid) FillNan(*loss);
  return error;
}

ffi::Error InBatchGradHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                           ffi::AnyBuffer anchors, ffi::AnyBuffer upstream,
                           ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> positive_margin,
                           ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> loss,
                           int32_t distance, int32_t pair_weighting, int32_t max_block_rows,
                           int32_t miner, int32_t miner_epsilon_bits) {
  HostInputs in;
  ffi::Error error =
      ReadInBatchHostInputs(labels, embeddings, anchors, margin, positive_margin, distance,
                            pair_weighting, max_block_rows, miner, miner_epsilon_bits, &in);
  if (!error.success()) return error;
  in.args.upstream = upstream.untyped_data();
  in.args.grad = grad->untyped_data();
  in.args.loss = loss->untyped_data();
  error = RunHostKernel(pool, in.supported,
                        [&](const ParallelFor& p) { return InBatchLossCpu(in.args, p); });
  if (error.success() && !in.margins_valid) {
    FillNan(*grad);
    FillNan(*loss);
  }
  return error;
}

ffi::Error InBatchLossReducedHost(
    ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer embeddings, ffi::AnyBuffer anchors,
    ffi::AnyBuffer weights, ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> positive_margin,
    ffi::BufferR0<ffi::F64> loss_scale, ffi::Result<ffi::AnyBuffer> loss,
    ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t distance,
    int32_t pair_weighting, int32_t max_block_rows, int32_t miner, int32_t miner_epsilon_bits,
    int32_t reduction) {
  HostInputs in;
  ffi::Error error =
      ReadInBatchHostInputs(labels, embeddings, anchors, margin, positive_margin, distance,
                            pair_weighting, max_block_rows, miner, miner_epsilon_bits, &in);
  if (!error.success()) return error;
  InBatchReducedArgs args;
  args.in = in.args;
  const int64_t anchor_count = args.in.anchor_end - args.in.anchor_begin;
  if (weights.dimensions().size() == 1 && weights.dimensions()[0] != anchor_count) {
    return ffi::Error(
        ffi::ErrorCode::kInvalidArgument,
        "in-batch contrastive loss: sample_weight must be a scalar or one per anchor (" +
            std::to_string(anchor_count) + "), got " + std::to_string(weights.dimensions()[0]));
  }
  args.reduction = HostReduction(weights, loss_scale, loss, reduction_scale, reduction);
  args.grad = grad->untyped_data();
  error = RunHostKernel(pool, in.supported,
                        [&](const ParallelFor& p) { return InBatchLossReducedCpu(args, p); });
  // The reduction scale does not depend on the margins: it stays.
  if (error.success() && !in.margins_valid) {
    FillNan(*loss);
    FillNan(*grad);
  }
  return error;
}

// JAX's loss (upstream null) or gradient handler on the host.
ffi::Error InBatchJaxHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                          const void* upstream, void* grad, void* loss, double margin,
                          double positive_margin, int32_t distance, int32_t pair_weighting,
                          int32_t max_block_rows, int32_t miner, int32_t miner_epsilon_bits,
                          int64_t anchors) {
  InBatchArgs args;
  ffi::Error error = ReadJaxInBatchArgs(labels, embeddings, upstream, grad, loss, margin,
                                        positive_margin, distance, pair_weighting, max_block_rows,
                                        miner, miner_epsilon_bits, anchors, &args);
  if (!error.success()) return error;
  return RunHostKernel(pool, true, [&](const ParallelFor& p) { return InBatchLossCpu(args, p); });
}

ffi::Error InBatchLossJaxHost(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                              ffi::AnyBuffer embeddings, ffi::Result<ffi::AnyBuffer> loss,
                              double margin, double positive_margin, int32_t distance,
                              int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                              int32_t miner_epsilon_bits, int64_t anchors) {
  return InBatchJaxHost(pool, labels, embeddings, nullptr, nullptr, loss->untyped_data(), margin,
                        positive_margin, distance, pair_weighting, max_block_rows, miner,
                        miner_epsilon_bits, anchors);
}

ffi::Error InBatchGradJaxHost(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                              ffi::AnyBuffer embeddings, ffi::AnyBuffer upstream,
                              ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> loss,
                              double margin, double positive_margin, int32_t distance,
                              int32_t pair_weighting, int32_t max_block_rows, int32_t miner,
                              int32_t miner_epsilon_bits, int64_t anchors) {
  return InBatchJaxHost(pool, labels, embeddings, upstream.untyped_data(), grad->untyped_data(),
                        loss->untyped_data(), margin, positive_margin, distance, pair_weighting,
                        max_block_rows, miner, miner_epsilon_bits, anchors);
}

}  // namespace

ffi::Error ReadJaxInBatchArgs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                              const void* upstream, void* grad, void* loss, double margin,
                              double positive_margin, int32_t distance, int32_t pair_weighting,
                              int32_t max_block_rows, int32_t miner, int32_t miner_epsilon_bits,
                              int64_t anchors, InBatchArgs* args) {
  const auto fail = [](const char* problem) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("in-batch contrastive loss: ") + problem);
  };
  if (embeddings.dimensions().size() != 2 || !FromFfi(embeddings.element_type(), &args->type) ||
      !IsInBatchDType(args->type)) {
    return fail("embeddings must be float32 or float64 [B, D]");
  }
  args->rows = embeddings.dimensions()[0];
  args->dim = embeddings.dimensions()[1];
  const bool int64_bytes =
      labels.element_type() == ffi::DataType::S64 || labels.element_type() == ffi::DataType::S32;
  if (!int64_bytes || static_cast<int64_t>(labels.size_bytes()) !=
                          args->rows * static_cast<int64_t>(sizeof(int64_t))) {
    return fail("labels must be B int64 ids, as int64 [B] or int32 [B, 2]");
  }
  if (!IsValidMargin(margin) || !IsValidMargin(positive_margin)) {
    return fail("the margins must be finite and non-negative");
  }
  args->labels = static_cast<const int64_t*>(labels.untyped_data());
  args->embeddings = embeddings.untyped_data();
  args->margin = margin;
  args->positive_margin = positive_margin;
  SetInBatchAttrs(distance, pair_weighting, max_block_rows, miner, miner_epsilon_bits, args);
  args->upstream = upstream;
  args->grad = grad;
  args->loss = loss;
  const int64_t range[] = {0, anchors, args->rows, args->rows};
  const std::string problem = SetInBatchAnchors(range, args);
  return problem.empty() ? ffi::Error::Success() : fail(problem.c_str());
}

// C symbols (declared in ffi/targets.h), outside the unnamed namespace.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLoss, InBatchLossHost,
                              InBatchAttrs(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::AnyBuffer>()           // labels: int64
                                               .Arg<ffi::AnyBuffer>()           // embeddings
                                               .Arg<ffi::AnyBuffer>()           // anchors: 4 int64
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                               .Ret<ffi::AnyBuffer>()           // loss
                                           ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossGrad, InBatchGradHost,
                              InBatchAttrs(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::AnyBuffer>()           // labels: int64
                                               .Arg<ffi::AnyBuffer>()           // embeddings
                                               .Arg<ffi::AnyBuffer>()           // anchors: 4 int64
                                               .Arg<ffi::AnyBuffer>()           // upstream
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                               .Ret<ffi::AnyBuffer>()           // grad
                                               .Ret<ffi::AnyBuffer>()           // loss
                                           ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossReduced, InBatchLossReducedHost,
                              InBatchAttrs(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::AnyBuffer>()           // labels: int64
                                               .Arg<ffi::AnyBuffer>()           // embeddings
                                               .Arg<ffi::AnyBuffer>()           // anchors: 4 int64
                                               .Arg<ffi::AnyBuffer>()           // sample_weight
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // positive_margin
                                               .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                                               .Ret<ffi::AnyBuffer>()           // loss
                                               .Ret<ffi::AnyBuffer>()           // grad
                                               .Ret<ffi::AnyBuffer>()           // reduction_scale
                                           )
                                  .Attr<int32_t>("reduction"));

// JAX's (ffi/args.h): margins as float64 attrs, labels as int64 bytes, every
// row an anchor.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossJax, InBatchLossJaxHost,
                              InBatchLossJaxBinding(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveInBatchLossGradJax, InBatchGradJaxHost,
                              InBatchGradJaxBinding(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace fused_contrastive
