// The loss from pair embeddings' typed-FFI handlers (ffi/targets.h): they run
// the fused CPU kernels (core/pairs) for the custom calls tf/xla/pairs.cc emits
// on XLA's CPU backend and JAX's front end makes. Operands and results are the
// TF ops' inputs and outputs in order (tf/pairs.h): a and b as [rows, D], the stacked pair and its
// gradient as [rows, 2, D], labels and per-row inputs as [rows] or scalars, margin and loss_scale
// float64 scalars. JAX calls the loss handlers with the margin as an attr
// (FusedContrastiveEmbeddingLossJax, and FusedContrastiveEmbeddingPairLossJax
// on the stacked pairs, whose gradient is FusedContrastiveEmbeddingPairLossGrad's).
#include <cstdint>
#include <initializer_list>

#include "core/pairs/kernels.h"
#include "ffi/args.h"
#include "ffi/host.h"
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {

PairRows SeparateRows(ffi::AnyBuffer a, ffi::AnyBuffer b) {
  return {a.untyped_data(), b.untyped_data(), a.dimensions()[a.dimensions().size() - 1]};
}

PairRows StackedRows(ffi::AnyBuffer pairs, void* data) {
  DType type;
  const int64_t dim = pairs.dimensions()[pairs.dimensions().size() - 1];
  // An unsupported dtype gets b = a; the readers then reject the dtype.
  void* b = FromFfi(pairs.element_type(), &type) ? StackedPairB(type, data, dim) : data;
  return {data, b, 2 * dim};
}

bool ReadEmbeddingInputs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings, PairRows rows,
                         double margin, int32_t similar_label, int32_t distance,
                         EmbeddingInputs* in, bool* margin_valid) {
  in->labels = labels.untyped_data();
  in->a = rows.a;
  in->b = rows.b;
  in->rows = embeddings.dimensions()[0];
  in->dim = embeddings.dimensions()[embeddings.dimensions().size() - 1];
  in->row_stride = rows.row_stride;
  *margin_valid = IsValidMargin(margin);
  in->margin = *margin_valid ? margin : 0.0;
  in->similar_label = similar_label;
  in->distance = static_cast<Distance>(distance);
  return FromFfi(labels.element_type(), &in->label_type) &&
         FromFfi(embeddings.element_type(), &in->embedding_type);
}

bool CoefficientsFit(ffi::AnyBuffer coefficients, int64_t rows, Distance distance) {
  return static_cast<int64_t>(coefficients.size_bytes()) ==
         rows * NumRowCoefficients(distance) * static_cast<int64_t>(sizeof(double));
}

ffi::Error ReadEmbeddingGradArgs(ffi::AnyBuffer embeddings, PairRows rows, PairRows grads,
                                 ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                                 int32_t distance, EmbeddingGradArgs* args) {
  args->a = rows.a;
  args->b = rows.b;
  args->rows = embeddings.dimensions()[0];
  args->dim = embeddings.dimensions()[embeddings.dimensions().size() - 1];
  args->row_stride = rows.row_stride;
  args->distance = static_cast<Distance>(distance);
  if (!FromFfi(embeddings.element_type(), &args->type) ||
      !CoefficientsFit(coefficients, args->rows, args->distance)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "contrastive loss: the coefficients are not the loss handler's, or the "
                      "embeddings' dtype is not supported");
  }
  args->coefficients = static_cast<const double*>(coefficients.untyped_data());
  args->upstream = upstream.untyped_data();
  args->scalar_upstream = upstream.dimensions().size() == 0;
  args->grad_a = grads.a;
  args->grad_b = grads.b;
  return ffi::Error::Success();
}

namespace {

// The margin as an attr, as JAX passes it: a float64 that needs no
// jax_enable_x64.
ffi::Error EmbeddingLossOnRows(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                               ffi::AnyBuffer embeddings, PairRows rows,
                               ffi::Result<ffi::AnyBuffer> loss,
                               ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                               int32_t distance, int32_t similar_label) {
  EmbeddingInputs in;
  bool margin_valid;
  const bool read = ReadEmbeddingInputs(labels, embeddings, rows, margin, similar_label, distance,
                                        &in, &margin_valid);
  if (!CoefficientsFit(*coefficients, in.rows, in.distance)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "contrastive loss: the coefficients buffer has the wrong size");
  }
  ffi::Error error = RunHostKernel(pool, read, [&](const ParallelFor& p) {
    return EmbeddingLossCpu(in, loss->untyped_data(),
                            static_cast<double*>(coefficients->untyped_data()), p);
  });
  if (error.success() && !margin_valid) {
    FillNan(*loss);
    FillNan(*coefficients);
  }
  return error;
}

ffi::Error EmbeddingLossJaxHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer a,
                                ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> loss,
                                ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                                int32_t distance, int32_t similar_label) {
  return EmbeddingLossOnRows(pool, labels, a, SeparateRows(a, b), loss, coefficients, margin,
                             distance, similar_label);
}

ffi::Error EmbeddingPairLossJaxHost(ffi::ThreadPool pool, ffi::AnyBuffer labels,
                                    ffi::AnyBuffer pairs, ffi::Result<ffi::AnyBuffer> loss,
                                    ffi::Result<ffi::AnyBuffer> coefficients, double margin,
                                    int32_t distance, int32_t similar_label) {
  return EmbeddingLossOnRows(pool, labels, pairs, StackedRows(pairs, pairs.untyped_data()), loss,
                             coefficients, margin, distance, similar_label);
}

// The margin as an operand, as TensorFlow's XLA passes it (it may be a
// run-time tensor).
ffi::Error EmbeddingLossHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer a,
                             ffi::AnyBuffer b, ffi::BufferR0<ffi::F64> margin,
                             ffi::Result<ffi::AnyBuffer> loss,
                             ffi::Result<ffi::AnyBuffer> coefficients, int32_t distance,
                             int32_t similar_label) {
  return EmbeddingLossJaxHost(pool, labels, a, b, loss, coefficients, margin.typed_data()[0],
                              distance, similar_label);
}

ffi::Error EmbeddingGradOnRows(ffi::ThreadPool pool, ffi::AnyBuffer embeddings, PairRows rows,
                               PairRows grads, ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                               int32_t distance) {
  EmbeddingGradArgs args;
  ffi::Error error =
      ReadEmbeddingGradArgs(embeddings, rows, grads, coefficients, upstream, distance, &args);
  if (!error.success()) return error;
  return RunHostKernel(pool, true, [&](const ParallelFor& p) { return EmbeddingGradCpu(args, p); });
}

ffi::Error EmbeddingGradHost(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                             ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                             ffi::Result<ffi::AnyBuffer> grad_a, ffi::Result<ffi::AnyBuffer> grad_b,
                             int32_t distance) {
  return EmbeddingGradOnRows(pool, a, SeparateRows(a, b), SeparateRows(*grad_a, *grad_b),
                             coefficients, upstream, distance);
}

ffi::Error EmbeddingPairGradHost(ffi::ThreadPool pool, ffi::AnyBuffer pairs,
                                 ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                                 ffi::Result<ffi::AnyBuffer> grad, int32_t distance) {
  return EmbeddingGradOnRows(pool, pairs, StackedRows(pairs, pairs.untyped_data()),
                             StackedRows(pairs, grad->untyped_data()), coefficients, upstream,
                             distance);
}

// The reduced handlers' common part, with args set: the call, and NaN for an
// invalid margin in `margin_results` (the loss and the gradients; the
// reduction scale does not depend on the margin).
ffi::Error RunReducedHost(ffi::ThreadPool pool, const ReducedEmbeddingArgs& args, bool read_ok,
                          bool margin_valid, std::initializer_list<ffi::AnyBuffer> margin_results) {
  ffi::Error error = RunHostKernel(
      pool, read_ok, [&](const ParallelFor& p) { return EmbeddingLossReducedCpu(args, p); });
  if (error.success() && !margin_valid) {
    for (const ffi::AnyBuffer& result : margin_results) FillNan(result);
  }
  return error;
}

ffi::Error EmbeddingLossReducedHost(
    ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer a, ffi::AnyBuffer b,
    ffi::AnyBuffer weights, ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> loss_scale,
    ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad_a,
    ffi::Result<ffi::AnyBuffer> grad_b, ffi::Result<ffi::AnyBuffer> reduction_scale,
    int32_t distance, int32_t reduction, int32_t similar_label) {
  ReducedEmbeddingArgs args;
  bool margin_valid;
  const bool read_ok = ReadEmbeddingInputs(labels, a, SeparateRows(a, b), margin.typed_data()[0],
                                           similar_label, distance, &args.in, &margin_valid);
  args.reduction = HostReduction(weights, loss_scale, loss, reduction_scale, reduction);
  args.grad_a = grad_a->untyped_data();
  args.grad_b = grad_b->untyped_data();
  return RunReducedHost(pool, args, read_ok, margin_valid, {*loss, *grad_a, *grad_b});
}

// Pairs and their gradient [rows, 2, D], read and written in place.
ffi::Error EmbeddingPairLossReducedHost(
    ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer pairs, ffi::AnyBuffer weights,
    ffi::BufferR0<ffi::F64> margin, ffi::BufferR0<ffi::F64> loss_scale,
    ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad,
    ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t distance, int32_t reduction,
    int32_t similar_label) {
  ReducedEmbeddingArgs args;
  bool margin_valid;
  const bool read_ok =
      ReadEmbeddingInputs(labels, pairs, StackedRows(pairs, pairs.untyped_data()),
                          margin.typed_data()[0], similar_label, distance, &args.in, &margin_valid);
  args.reduction = HostReduction(weights, loss_scale, loss, reduction_scale, reduction);
  const PairRows grads = StackedRows(pairs, grad->untyped_data());
  args.grad_a = grads.a;
  args.grad_b = grads.b;
  return RunReducedHost(pool, args, read_ok, margin_valid, {*loss, *grad});
}

}  // namespace

// C symbols (declared in ffi/targets.h), outside the unnamed namespace.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveEmbeddingLoss, EmbeddingLossHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // labels
                                  .Arg<ffi::AnyBuffer>()           // a
                                  .Arg<ffi::AnyBuffer>()           // b
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Ret<ffi::AnyBuffer>()           // coefficients
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("similar_label"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingLossJax, EmbeddingLossJaxHost,
    EmbeddingLossJaxBinding</*kStacked=*/false>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingPairLossJax, EmbeddingPairLossJaxHost,
    EmbeddingLossJaxBinding</*kStacked=*/true>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingLossGrad, EmbeddingGradHost,
    EmbeddingGradBinding</*kStacked=*/false>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FusedContrastiveEmbeddingPairLossGrad, EmbeddingPairGradHost,
    EmbeddingGradBinding</*kStacked=*/true>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveEmbeddingLossReduced, EmbeddingLossReducedHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // labels
                                  .Arg<ffi::AnyBuffer>()           // a
                                  .Arg<ffi::AnyBuffer>()           // b
                                  .Arg<ffi::AnyBuffer>()           // sample_weight
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Ret<ffi::AnyBuffer>()           // grad_a
                                  .Ret<ffi::AnyBuffer>()           // grad_b
                                  .Ret<ffi::AnyBuffer>()           // reduction_scale
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("reduction")
                                  .Attr<int32_t>("similar_label"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveEmbeddingPairLossReduced,
                              EmbeddingPairLossReducedHost,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // labels
                                  .Arg<ffi::AnyBuffer>()           // pairs
                                  .Arg<ffi::AnyBuffer>()           // sample_weight
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // margin
                                  .Arg<ffi::BufferR0<ffi::F64>>()  // loss_scale
                                  .Ret<ffi::AnyBuffer>()           // loss
                                  .Ret<ffi::AnyBuffer>()           // grad
                                  .Ret<ffi::AnyBuffer>()           // reduction_scale
                                  .Attr<int32_t>("distance")
                                  .Attr<int32_t>("reduction")
                                  .Attr<int32_t>("similar_label"));

}  // namespace fused_contrastive
