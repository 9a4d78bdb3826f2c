// Kernel entry points of the loss from pair embeddings, on raw pointers (no
// TensorFlow types), for the TF OpKernels, the pybind11 module and the
// benchmarks. Embeddings a and b are `rows` rows of `dim` contiguous elements
// each, row r at r * row_stride elements from a (and from b), one label per
// row; the per-row loss is the contrastive loss of the row's distance
// (core/pairs/math.h). row_stride is dim for two [..., D] tensors, and 2 * dim
// for the stacked pair [..., 2, D] a Keras model outputs (StackedPairB): the
// kernels then read the pair, and write its gradient, in place.
#ifndef FUSED_CONTRASTIVE_CORE_PAIRS_KERNELS_H_
#define FUSED_CONTRASTIVE_CORE_PAIRS_KERNELS_H_

#include <cstdint>

#include "core/common/dtypes.h"
#include "core/common/formula.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"
#include "core/pairs/math.h"

namespace fused_contrastive {

struct EmbeddingInputs {
  DType label_type;
  DType embedding_type;  // a floating-point DType; the loss has it too
  const void* labels;    // rows values
  const void* a;         // rows of dim values each, row_stride apart
  const void* b;
  int64_t rows;
  int64_t dim;
  int64_t row_stride;  // >= dim; gradients are written with the same stride
  double margin;
  int similar_label;
  Distance distance;
};

// Bytes of one element of a floating-point DType (0 for others).
inline int64_t ElementBytes(DType type) {
  int64_t bytes = 0;
  VisitDistanceDType(type, [&](auto tag) { bytes = sizeof(typename decltype(tag)::type); });
  return bytes;
}

// A stacked pair [rows, 2, dim] of `type` at `pairs` (and its gradient) is
// a at `pairs` and b at this address, both with row_stride 2 * dim.
inline void* StackedPairB(DType type, const void* pairs, int64_t dim) {
  return static_cast<char*>(const_cast<void*>(pairs)) + dim * ElementBytes(type);
}

// Per-row loss (rows values of embedding_type) and the gradient coefficients
// of core/pairs/math.h for g = d(loss)/d(distance): rows * NumRowCoefficients
// doubles, row-major. A row is read once; row sums accumulate in the compute
// type over chunks of kRowSumChunk elements, the chunks' sums in double, in an
// order fixed by the binary. False for an unsupported dtype pair.
bool EmbeddingLossCpu(const EmbeddingInputs& in, void* loss, double* coefficients,
                      const ParallelFor& parallel_for);

// Backward of EmbeddingLossCpu: grad_a, grad_b (rows of dim values of `type`)
// from the saved coefficients, each row's scaled by its upstream gradient.
struct EmbeddingGradArgs {
  DType type;
  const void* a;
  const void* b;
  int64_t rows;
  int64_t dim;
  int64_t row_stride;  // of a, b, grad_a and grad_b, as EmbeddingInputs'
  Distance distance;
  const double* coefficients;  // rows * NumRowCoefficients(distance)
  const void* upstream;        // `type`: rows values, or one when scalar_upstream
  bool scalar_upstream;
  void* grad_a;
  void* grad_b;
};
bool EmbeddingGradCpu(const EmbeddingGradArgs& args, const ParallelFor& parallel_for);

// The Keras reduction of the per-row losses and the fully scaled gradients
// with respect to both embeddings, from one pass: each row is read, its loss
// and coefficients computed, and the row read again (from cache) to write its
// gradients. Sums and divisor as ContrastiveLossReducedCpu (weights: rows
// values of embedding_type, or one when scalar_weight).
struct ReducedEmbeddingArgs {
  EmbeddingInputs in;
  ReductionArgs reduction;  // weights and loss of embedding_type
  void* grad_a;             // out: rows of dim values at in.row_stride, d(loss)/da
  void* grad_b;
};
bool EmbeddingLossReducedCpu(const ReducedEmbeddingArgs& args, const ParallelFor& parallel_for);

// Calls f(TypeTag<T>, DistanceTag<K>) for a supported embedding dtype and
// distance; false when there is none. The gradients need no labels, and the
// GPU kernels read theirs at run time (LabelAs).
template <typename F>
bool VisitEmbeddingTypeAndDistance(DType embedding_type, Distance distance, F&& f) {
  bool distance_ok = false;
  const bool type_ok = VisitDistanceDType(embedding_type, [&](auto t) {
    distance_ok = VisitDistance(distance, [&](auto k) { f(t, k); });
  });
  return type_ok && distance_ok;
}

// Calls f(TypeTag<L>, TypeTag<T>, DistanceTag<K>) for a supported label and
// embedding dtype pair and distance; false when there is none.
template <typename F>
bool VisitEmbeddingKernel(DType label_type, DType embedding_type, Distance distance, F&& f) {
  bool supported = false;
  const bool label_ok = VisitDType(label_type, [&](auto l) {
    supported = VisitEmbeddingTypeAndDistance(embedding_type, distance,
                                              [&](auto t, auto k) { f(l, t, k); });
  });
  return label_ok && supported;
}

// The same three computations on device pointers (coefficients, upstream,
// weights and reduction_scale included), enqueued on `stream`. Only in
// builds with CUDA. Deterministic; sums follow the GPU's own fixed order, so
// they match the CPU kernel to rounding, not bit for bit.
GpuStatus EmbeddingLossGpu(const EmbeddingInputs& in, void* loss, double* coefficients,
                           void* stream);
GpuStatus EmbeddingGradGpu(const EmbeddingGradArgs& args, void* stream);
int64_t EmbeddingLossReducedGpuWorkspace(int64_t rows);
GpuStatus EmbeddingLossReducedGpu(const ReducedEmbeddingArgs& args, void* workspace, void* stream);

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_PAIRS_KERNELS_H_
