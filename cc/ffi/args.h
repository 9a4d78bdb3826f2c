// What the typed-FFI handlers read from their operands and attrs, shared by
// the host handlers (ffi/<family>.cc) and the CUDA handlers of JAX's front
// end (ffi/gpu.cc): pointers, sizes and dtypes, never values, so that device
// buffers serve as well as host ones. An error names a bad call.
#ifndef FUSED_CONTRASTIVE_FFI_ARGS_H_
#define FUSED_CONTRASTIVE_FFI_ARGS_H_

#include <cstdint>
#include <utility>

#include "core/distances/kernels.h"
#include "core/in_batch/kernels.h"
#include "core/pairs/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {

namespace ffi = ::xla::ffi;

// The loss on distances: labels and distances of one size, a valid margin.
ffi::Error ReadLossInputs(ffi::AnyBuffer labels, ffi::AnyBuffer distances, double margin,
                          int32_t similar_label, LossInputs* in);

// Where the pairs' two embeddings lie, as operands or as the gradient results
// of the same layout: two buffers a and b [rows, D] (SeparateRows), or one
// stacked buffer [rows, 2, D] (StackedRows: b at StackedPairB, rows 2 * D
// apart), which the kernels read and write in place.
struct PairRows {
  void* a;
  void* b;
  int64_t row_stride;
};
PairRows SeparateRows(ffi::AnyBuffer a, ffi::AnyBuffer b);
// `data`: the stacked pairs' own, or their gradient's (the same shape and dtype).
PairRows StackedRows(ffi::AnyBuffer pairs, void* data);

// The loss from pair embeddings: labels [rows], the embeddings at `rows`
// (`embeddings` is one of their buffers) and the margin; false for an
// unsupported dtype. The kernels need a valid margin: an invalid run-time one
// is passed as 0 and *margin_valid is false, for the caller to make its
// results NaN (the rule of CheckConstantMargin).
bool ReadEmbeddingInputs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings, PairRows rows,
                         double margin, int32_t similar_label, int32_t distance,
                         EmbeddingInputs* in, bool* margin_valid);

// Whether a coefficients buffer holds rows * NumRowCoefficients(distance)
// float64s' bytes (JAX declares them as uint32 pairs: it has no float64
// without jax_enable_x64).
bool CoefficientsFit(ffi::AnyBuffer coefficients, int64_t rows, Distance distance);

// The pair loss's gradient from the loss's coefficients: the embeddings at
// `rows` (`embeddings` is one of their buffers), the coefficients
// (CoefficientsFit), the upstream gradient [rows] or scalar, and the
// gradients at `grads`.
ffi::Error ReadEmbeddingGradArgs(ffi::AnyBuffer embeddings, PairRows rows, PairRows grads,
                                 ffi::AnyBuffer coefficients, ffi::AnyBuffer upstream,
                                 int32_t distance, EmbeddingGradArgs* args);

// The in-batch loss as JAX's front end calls it: the first `anchors` rows
// are the anchors (the batch), the rest references that get their gradient;
// the margins as float64 attrs; the class ids as int64s: an S64 [rows]
// buffer, or the same bytes as S32 [rows, 2] (each id's two halves; JAX has
// no int64 without jax_enable_x64); upstream and grad null for the loss alone.
ffi::Error ReadJaxInBatchArgs(ffi::AnyBuffer labels, ffi::AnyBuffer embeddings,
                              const void* upstream, void* grad, void* loss, double margin,
                              double positive_margin, int32_t distance, int32_t pair_weighting,
                              int32_t max_block_rows, int32_t miner, int32_t miner_epsilon_bits,
                              int64_t anchors, InBatchArgs* args);

// The bindings' operands, results and attrs after their context (a thread
// pool on the host; a stream, and scratch for the in-batch loss, on CUDA):
// one list per target for both platforms. b: ffi::Ffi::Bind().Ctx<...>().

// The in-batch targets' attrs (TensorFlow's and JAX's).
template <typename B>
auto InBatchAttrs(B b) {
  return std::move(b)
      .template Attr<int32_t>("distance")
      .template Attr<int32_t>("pair_weighting")
      .template Attr<int32_t>("max_block_rows")
      .template Attr<int32_t>("miner")
      .template Attr<int32_t>("miner_epsilon_bits");
}

// The loss on distances: labels, distances -> loss, d(loss)/d(distance).
template <typename B>
auto LossBinding(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<double>("margin")
      .template Attr<int32_t>("similar_label");
}

// The pair embeddings' operands, and their gradients' results: a and b, or
// the stacked pairs (kStacked).
// (By reference: a Binding's move constructor is private.)
template <bool kStacked, typename B>
auto PairOperands(B&& b) {
  if constexpr (kStacked) {
    return std::move(b).template Arg<ffi::AnyBuffer>();
  } else {
    return std::move(b).template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>();
  }
}
template <bool kStacked, typename B>
auto PairResults(B&& b) {
  if constexpr (kStacked) {
    return std::move(b).template Ret<ffi::AnyBuffer>();
  } else {
    return std::move(b).template Ret<ffi::AnyBuffer>().template Ret<ffi::AnyBuffer>();
  }
}

// JAX's pair loss: labels, a, b (or pairs) -> loss, coefficients.
template <bool kStacked, typename B>
auto EmbeddingLossJaxBinding(B b) {
  return PairOperands<kStacked>(std::move(b).template Arg<ffi::AnyBuffer>())
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<double>("margin")
      .template Attr<int32_t>("distance")
      .template Attr<int32_t>("similar_label");
}

// The pair loss's gradient (TensorFlow's and JAX's): a, b (or pairs),
// coefficients, upstream -> grad_a, grad_b (or the pairs' gradient).
template <bool kStacked, typename B>
auto EmbeddingGradBinding(B b) {
  return PairResults<kStacked>(PairOperands<kStacked>(std::move(b))
                                   .template Arg<ffi::AnyBuffer>()
                                   .template Arg<ffi::AnyBuffer>())
      .template Attr<int32_t>("distance");
}

// JAX's in-batch loss: labels, embeddings -> loss; with `upstream`, labels,
// embeddings, upstream -> grad, loss.
template <typename B>
auto InBatchJaxMargins(B b) {
  return InBatchAttrs(
             std::move(b).template Attr<double>("margin").template Attr<double>("positive_margin"))
      .template Attr<int64_t>("anchors");
}
template <typename B>
auto InBatchLossJaxBinding(B b) {
  return InBatchJaxMargins(std::move(b)
                               .template Arg<ffi::AnyBuffer>()
                               .template Arg<ffi::AnyBuffer>()
                               .template Ret<ffi::AnyBuffer>());
}
template <typename B>
auto InBatchGradJaxBinding(B b) {
  return InBatchJaxMargins(std::move(b)
                               .template Arg<ffi::AnyBuffer>()
                               .template Arg<ffi::AnyBuffer>()
                               .template Arg<ffi::AnyBuffer>()
                               .template Ret<ffi::AnyBuffer>()
                               .template Ret<ffi::AnyBuffer>());
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_FFI_ARGS_H_
