// The CUDA launch of the contrastive loss from pair embeddings. The math is
// core/pairs/math.h, shared with the CPU kernel; this file adds the traversal
// of the rows, the sums and the launches. Compiled with --fmad=false, so from
// equal row sums a row's loss and gradients are the CPU kernel's bits; only
// the order of the additions in sums differs.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "core/common/gpu_common.cuh"
#include "core/pairs/kernels.h"
#include "core/pairs/math.h"

namespace fused_contrastive {
namespace {

// One warp per row: its lanes share the row's sums through shuffles, without
// shared memory or block barriers.
constexpr int kWarpSize = 32;
constexpr unsigned kWholeWarp = 0xffffffffu;

// A row is traversed in chunks of 16 bytes.
template <typename T>
constexpr int kChunkSize = 16 / sizeof(T);
template <typename T>
using Chunk = Pack<T, kChunkSize<T>>;

// Calls f(r) for the rows of this thread's warp, grid-stride. The row index
// is the same on all lanes, so whole warps enter every shuffle.
template <typename F>
__device__ inline void ForEachRow(int64_t rows, F&& f) {
  const int64_t warps = blockDim.x / kWarpSize;
  const int64_t stride = warps * gridDim.x;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / kWarpSize; r < rows; r += stride) f(r);
}

// Calls f(c, a_chunk, b_chunk, size) for the chunks c of a row this lane
// owns, c % 32 == lane, in increasing order; size is the chunk's element
// count (less than kChunkSize only for the row's last chunk). kVector loads
// each chunk as one 16-byte access (aligned rows of whole chunks), else
// element by element: a lane adds the same elements in the same order either
// way, so the sums do not depend on the pointers' alignment. Both passes
// over a row give an element to the same lane, so its gradient is written by
// the thread that read it: grad_a and grad_b may alias a and b (TensorFlow
// forwards the inputs' buffers).
template <bool kVector, typename T, typename F>
__device__ inline void ForEachChunk(const T* a, const T* b, int64_t dim, F&& f) {
  constexpr int V = kChunkSize<T>;
  const int64_t chunks = (dim + V - 1) / V;
  for (int64_t c = threadIdx.x % kWarpSize; c < chunks; c += kWarpSize) {
    Chunk<T> a_chunk, b_chunk;
    int size = V;
    if constexpr (kVector) {
      a_chunk = reinterpret_cast<const Chunk<T>*>(a)[c];
      b_chunk = reinterpret_cast<const Chunk<T>*>(b)[c];
    } else {
      size = dim - c * V < V ? static_cast<int>(dim - c * V) : V;
      // Unrolled, so that the chunks stay in registers.
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (i == size) break;
        a_chunk.v[i] = a[c * V + i];
        b_chunk.v[i] = b[c * V + i];
      }
    }
    f(c, a_chunk, b_chunk, size);
  }
}

template <bool kVector, typename T>
__device__ inline void StoreChunk(const Chunk<T>& chunk, int64_t c, int size, T* row) {
  if constexpr (kVector) {
    reinterpret_cast<Chunk<T>*>(row)[c] = chunk;
  } else {
#pragma unroll
    for (int i = 0; i < kChunkSize<T>; ++i) {
      if (i == size) break;
      row[c * kChunkSize<T> + i] = chunk.v[i];
    }
  }
}

// The warp's total of one value per lane: a tree in a fixed order ending on
// lane 0, whose bits every lane then gets (the lanes compute the row's loss
// and coefficients from them, and must agree).
template <typename C>
__device__ inline C WarpSum(C value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kWholeWarp, value, offset);
  }
  return __shfl_sync(kWholeWarp, value, 0);
}

// The row's sums of its elements times scale_a and scale_b (cosine only), as
// the CPU kernel forms them: each chunk of kRowSumChunk elements summed in
// the compute type (per lane, then across the warp), the chunks' sums added
// in double. A chunk starts on a whole number of the warp's 32·kChunkSize
// steps, so each element stays with the lane that RowGradient gives it.
template <Distance K, bool kVector, typename T, typename C>
__device__ inline void ScaledRowSums(const T* a, const T* b, int64_t dim, C scale_a, C scale_b,
                                     C* sums) {
  static_assert(kRowSumChunk % (kWarpSize * kChunkSize<T>) == 0, "chunks must be whole steps");
  double total[kMaxRowSums] = {};
  for (int64_t start = 0; start < dim; start += kRowSumChunk) {
    C partial[kMaxRowSums] = {};
    const int64_t size = dim - start < kRowSumChunk ? dim - start : kRowSumChunk;
    ForEachChunk<kVector>(
        a + start, b + start, size,
        [&](int64_t, const Chunk<T>& a_chunk, const Chunk<T>& b_chunk, int count) {
#pragma unroll
          for (int i = 0; i < kChunkSize<T>; ++i) {
            if (i == count) break;
            C x = Convert<C>::from(a_chunk.v[i]), y = Convert<C>::from(b_chunk.v[i]);
            if constexpr (K == Distance::kCosine) {
              x *= scale_a;
              y *= scale_b;
            }
            C terms[kMaxRowSums];
            distance_terms<K>(x, y, terms[0], terms[1], terms[2]);
#pragma unroll
            for (int j = 0; j < NumRowSums(K); ++j) partial[j] += terms[j];
          }
        });
#pragma unroll
    for (int j = 0; j < NumRowSums(K); ++j) total[j] += WarpSum(partial[j]);
  }
#pragma unroll
  for (int j = 0; j < NumRowSums(K); ++j) sums[j] = static_cast<C>(total[j]);
}

// The warp's largest value of one per lane, on every lane.
template <typename C>
__device__ inline C WarpMax(C value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const C other = __shfl_xor_sync(kWholeWarp, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// A row's values (NumRowValues), as the CPU kernel's RowSums: the sums, and
// for cosine the scales, rows outside CosineScaling's range summed again.
// Every lane holds the same sums, so the warp takes the branch together.
template <Distance K, bool kVector, typename T, typename C>
__device__ inline void RowSums(const T* a, const T* b, int64_t dim, C* values) {
  ScaledRowSums<K, kVector>(a, b, dim, C(1), C(1), values);
  if constexpr (K == Distance::kCosine) {
    values[3] = values[4] = C(1);
    if (!cosine_sums_out_of_range(values)) return;
    C max_a = 0, max_b = 0;
    ForEachChunk<kVector>(
        a, b, dim, [&](int64_t, const Chunk<T>& a_chunk, const Chunk<T>& b_chunk, int count) {
#pragma unroll
          for (int i = 0; i < kChunkSize<T>; ++i) {
            if (i == count) break;
            const C x = ElementOps<C>::abs(Convert<C>::from(a_chunk.v[i]));
            const C y = ElementOps<C>::abs(Convert<C>::from(b_chunk.v[i]));
            max_a = x > max_a ? x : max_a;
            max_b = y > max_b ? y : max_b;
          }
        });
    values[3] = cosine_scale(WarpMax(max_a));
    values[4] = cosine_scale(WarpMax(max_b));
    ScaledRowSums<K, kVector>(a, b, dim, values[3], values[4], values);
  }
}

template <Distance K, bool kVector, typename T, typename C>
__device__ inline void RowGradient(const C* coef, const T* a, const T* b, int64_t dim, T* grad_a,
                                   T* grad_b) {
  ForEachChunk<kVector>(a, b, dim,
                        [&](int64_t c, const Chunk<T>& a_chunk, const Chunk<T>& b_chunk, int size) {
                          Chunk<T> ga, gb;
#pragma unroll
                          for (int i = 0; i < kChunkSize<T>; ++i) {
                            if (i == size) break;
                            C ga_i, gb_i;
                            element_gradient<K>(coef, Convert<C>::from(a_chunk.v[i]),
                                                Convert<C>::from(b_chunk.v[i]), &ga_i, &gb_i);
                            ga.v[i] = Store<T>::to(ga_i);
                            gb.v[i] = Store<T>::to(gb_i);
                          }
                          StoreChunk<kVector>(ga, c, size, grad_a);
                          StoreChunk<kVector>(gb, c, size, grad_b);
                        });
}

template <Distance K, bool kVector, typename T>
__global__ void EmbeddingLossKernel(const void* __restrict__ labels, DType label_type,
                                    const T* __restrict__ a, const T* __restrict__ b, int64_t rows,
                                    int64_t dim, int64_t stride, ComputeType<T> margin,
                                    int similar_label, T* __restrict__ loss,
                                    double* __restrict__ coefficients) {
  using C = ComputeType<T>;
  constexpr int kCoefficients = NumRowCoefficients(K);
  ForEachRow(rows, [&](int64_t r) {
    const C label = LabelAs<C>(labels, label_type, r);
    C sums[kMaxRowValues] = {}, coef[kMaxRowValues] = {}, row_loss;
    const int64_t offset = r * stride;
    RowSums<K, kVector>(a + offset, b + offset, dim, sums);
    row_loss_and_coefficients<K>(sums, label, margin, similar_label, &row_loss, coef);
    if (threadIdx.x % kWarpSize != 0) return;
    loss[r] = Store<T>::to(row_loss);
    for (int j = 0; j < kCoefficients; ++j) coefficients[r * kCoefficients + j] = coef[j];
  });
}

// No __restrict__ on the rows: the gradients may overwrite the embeddings.
template <Distance K, bool kVector, typename T>
__global__ void EmbeddingGradKernel(const T* a, const T* b, int64_t rows, int64_t dim,
                                    int64_t stride, const double* __restrict__ coefficients,
                                    const T* __restrict__ upstream, bool scalar_upstream, T* grad_a,
                                    T* grad_b) {
  using C = ComputeType<T>;
  constexpr int kCoefficients = NumRowCoefficients(K);
  ForEachRow(rows, [&](int64_t r) {
    const double u = Convert<double>::from(upstream[scalar_upstream ? 0 : r]);
    C coef[kMaxRowValues] = {};
    for (int j = 0; j < kCoefficients; ++j) {
      // Only the coefficients scale with the upstream gradient, not cosine's scales.
      const double c = coefficients[r * kCoefficients + j];
      coef[j] = static_cast<C>(j < NumRowSums(K) ? c * u : c);
    }
    const int64_t offset = r * stride;
    RowGradient<K, kVector>(coef, a + offset, b + offset, dim, grad_a + offset, grad_b + offset);
  });
}

// Per-row loss times weight summed in double: per warp over its rows, then
// over the block (BlockSum, so blockDim.x is kReduceThreads), one sum per
// block for FinishLossKernel.
template <Distance K, bool kVector, typename T>
__global__ void EmbeddingReducedKernel(const void* __restrict__ labels, DType label_type,
                                       const T* a, const T* b, const T* __restrict__ weights,
                                       bool scalar_weight, int64_t rows, int64_t dim,
                                       int64_t stride, ComputeType<T> margin, int similar_label,
                                       const double* scale, T* grad_a, T* grad_b,
                                       double* block_sums) {
  using C = ComputeType<T>;
  constexpr int kCoefficients = NumRowCoefficients(K);
  const C scale_c = static_cast<C>(*scale);
  const C scalar = scalar_weight ? Convert<C>::from(weights[0]) : C(0);
  double sum = 0;
  ForEachRow(rows, [&](int64_t r) {
    const C label = LabelAs<C>(labels, label_type, r);
    C sums[kMaxRowValues] = {}, coef[kMaxRowValues] = {}, row_loss;
    const int64_t offset = r * stride;
    RowSums<K, kVector>(a + offset, b + offset, dim, sums);
    row_loss_and_coefficients<K>(sums, label, margin, similar_label, &row_loss, coef);
    const C w = scalar_weight ? scalar : Convert<C>::from(weights[r]);
    sum += static_cast<double>(row_loss) * static_cast<double>(w);
    const C factor = w * scale_c;
    for (int j = 0; j < NumRowSums(K); ++j) coef[j] *= factor;
    RowGradient<K, kVector>(coef, a + offset, b + offset, dim, grad_a + offset, grad_b + offset);
  });
  // Every lane of a warp holds its rows' sum: lane 0 alone contributes it.
  const double total = BlockSum(threadIdx.x % kWarpSize == 0 ? sum : 0.0);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

// Blocks of `threads` for one row per warp, at most max_blocks (the kernels
// stride over the rest); at least one, so that a reduction over no rows
// still writes its block sum.
int RowBlocks(int64_t rows, int threads, int64_t max_blocks) {
  const int64_t warps = threads / kWarpSize;
  return static_cast<int>(std::max<int64_t>(1, std::min(max_blocks, (rows + warps - 1) / warps)));
}

// Calls f(std::true_type{}) when rows of `dim` elements of T, `stride`
// apart, at every pointer can be accessed as whole aligned chunks, else
// f(std::false_type{}).
template <typename T, typename F>
void VisitChunkAccess(int64_t dim, int64_t stride, std::initializer_list<const void*> pointers,
                      F&& f) {
  const bool vector = dim % kChunkSize<T> == 0 && stride % kChunkSize<T> == 0 &&
                      std::all_of(pointers.begin(), pointers.end(),
                                  [](const void* p) { return Aligned(p, sizeof(Chunk<T>)); });
  if (vector) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Whether the labels' dtype is one of ours: the kernels read labels of any
// of them (LabelAs), so that templates on it too do not make this file take
// 7x as long to compile.
bool LabelDTypeOk(DType label_type) {
  return VisitDType(label_type, [](auto) {});
}

}  // namespace

GpuStatus EmbeddingLossGpu(const EmbeddingInputs& in, void* loss, double* coefficients,
                           void* stream) {
  if (in.rows == 0) return GpuStatus{};
  const bool supported =
      LabelDTypeOk(in.label_type) &&
      VisitEmbeddingTypeAndDistance(in.embedding_type, in.distance, [&](auto t_tag, auto k_tag) {
        using T = typename decltype(t_tag)::type;
        constexpr Distance K = decltype(k_tag)::value;
        VisitChunkAccess<T>(in.dim, in.row_stride, {in.a, in.b}, [&](auto vector) {
          EmbeddingLossKernel<K, decltype(vector)::value>
              <<<RowBlocks(in.rows, kThreadsPerBlock, kMaxBlocks), kThreadsPerBlock, 0,
                 static_cast<cudaStream_t>(stream)>>>(
                  in.labels, in.label_type, static_cast<const T*>(in.a),
                  static_cast<const T*>(in.b), in.rows, in.dim, in.row_stride,
                  static_cast<ComputeType<T>>(in.margin), in.similar_label, static_cast<T*>(loss),
                  coefficients);
        });
      });
  if (!supported) return GpuStatus{"unsupported dtype pair or distance"};
  return LastError();
}

GpuStatus EmbeddingGradGpu(const EmbeddingGradArgs& g, void* stream) {
  if (g.rows == 0) return GpuStatus{};
  const bool supported =
      VisitEmbeddingTypeAndDistance(g.type, g.distance, [&](auto t_tag, auto k_tag) {
        using T = typename decltype(t_tag)::type;
        constexpr Distance K = decltype(k_tag)::value;
        VisitChunkAccess<T>(g.dim, g.row_stride, {g.a, g.b, g.grad_a, g.grad_b}, [&](auto vector) {
          EmbeddingGradKernel<K, decltype(vector)::value>
              <<<RowBlocks(g.rows, kThreadsPerBlock, kMaxBlocks), kThreadsPerBlock, 0,
                 static_cast<cudaStream_t>(stream)>>>(
                  static_cast<const T*>(g.a), static_cast<const T*>(g.b), g.rows, g.dim,
                  g.row_stride, g.coefficients, static_cast<const T*>(g.upstream),
                  g.scalar_upstream, static_cast<T*>(g.grad_a), static_cast<T*>(g.grad_b));
        });
      });
  if (!supported) return GpuStatus{"unsupported dtype or distance"};
  return LastError();
}

int64_t EmbeddingLossReducedGpuWorkspace(int64_t) { return kReducedWorkspaceBytes; }

// Runs for rows == 0 too: the loss (0) and the reduction scale are outputs.
GpuStatus EmbeddingLossReducedGpu(const ReducedEmbeddingArgs& args, void* workspace, void* stream) {
  const EmbeddingInputs& in = args.in;
  const int blocks = RowBlocks(in.rows, kReduceThreads, kMaxReduceBlocks);
  double* loss_sums = static_cast<double*>(workspace);
  double* weight_sums = loss_sums + kMaxReduceBlocks;
  const ReductionArgs& reduction = args.reduction;
  double* scale = reduction.reduction_scale;
  auto s = static_cast<cudaStream_t>(stream);
  const bool supported =
      LabelDTypeOk(in.label_type) &&
      VisitEmbeddingTypeAndDistance(in.embedding_type, in.distance, [&](auto t_tag, auto k_tag) {
        using T = typename decltype(t_tag)::type;
        constexpr Distance K = decltype(k_tag)::value;
        const auto* w = static_cast<const T*>(reduction.weights);
        LaunchReductionScale<T>(reduction, in.rows, weight_sums, s);
        VisitChunkAccess<T>(
            in.dim, in.row_stride, {in.a, in.b, args.grad_a, args.grad_b}, [&](auto vector) {
              EmbeddingReducedKernel<K, decltype(vector)::value><<<blocks, kReduceThreads, 0, s>>>(
                  in.labels, in.label_type, static_cast<const T*>(in.a),
                  static_cast<const T*>(in.b), w, reduction.scalar_weight, in.rows, in.dim,
                  in.row_stride, static_cast<ComputeType<T>>(in.margin), in.similar_label, scale,
                  static_cast<T*>(args.grad_a), static_cast<T*>(args.grad_b), loss_sums);
            });
        FinishLossKernel<<<1, kReduceThreads, 0, s>>>(loss_sums, blocks, scale,
                                                      static_cast<T*>(reduction.loss));
      });
  if (!supported) return GpuStatus{"unsupported dtype pair or distance"};
  return LastError();
}

}  // namespace fused_contrastive
