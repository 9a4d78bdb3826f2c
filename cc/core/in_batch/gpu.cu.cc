// The CUDA launch of the in-batch all-pairs contrastive loss. The math is
// core/in_batch/math.h, shared with the CPU kernel (cpu_sweep.h); this file
// adds the sweep, the sums and the launches.
//
// The sweep: rows are cut into blocks of R. For block I, S = E_I·Eᵀ (R×B, one
// GEMM), one pass over S (a CUDA block per row) gives the rows' losses and
// overwrites S with M, and a second GEMM adds −M·E to grad_I. When the
// anchors are a slice of the rows, anchor blocks pair with all rows, and
// partner blocks (before and after the anchors) with the anchors only, so
// pairs of two partners are never computed. Unlike the CPU
// kernel no symmetry is used: row i's block visits every pair (i, j) itself,
// so each row's sums and gradient are written by one CUDA block, in a fixed
// order, without atomics or cross-block races, and the results do not depend
// on the GPU. Scratch is the R×B tile plus a few values per row, and for
// the cosine distance a copy of E with rows of extreme scale divided by 2^k
// (cosine_row_exponent, as the CPU kernel): every cosine row is copied, so
// that the host needs no sync to learn whether any row is scaled; the copy
// is O(B·D) next to the sweep's O(B²·D).
#include <algorithm>
#include <type_traits>

#include "core/common/gpu_common.cuh"
#include "core/in_batch/gpu_row_reduce.cuh"
#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"

namespace fused_contrastive {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kWholeWarp = 0xffffffffu;

// The tile is the only scratch that grows with R·B; this bound keeps it
// affordable next to a model's own memory while leaving R in the thousands
// (full GEMM efficiency) up to B of several hundred thousand.
constexpr int64_t kMaxTileBytes = int64_t{256} << 20;
constexpr int64_t kWorkspaceAlignment = 256;

int64_t AlignUp(int64_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

int64_t ElementBytes(DType type) { return type == DType::kFloat64 ? 8 : 4; }

// Rows per block R: as many as the tile bound allows, at most max_block_rows
// when that is positive, at least one.
int64_t BlockRows(const InBatchArgs& args) {
  const int64_t row_bytes = std::max<int64_t>(1, args.rows) * ElementBytes(args.type);
  int64_t block = std::min(args.rows, kMaxTileBytes / row_bytes);
  if (args.max_block_rows > 0) block = std::min(block, args.max_block_rows);
  return std::max<int64_t>(block, 1);
}

// Words of the near-pair bit mask of one tile row (bit j: the pair (i, j)
// adds its gradient directly from e_i − e_j).
__host__ __device__ inline int64_t MaskWords(int64_t rows) {
  return (rows + kWarpSize - 1) / kWarpSize;
}

// The workspace, in this order, each part 256-byte aligned: per row the
// statistic (C), the pair weights (double, as pair_weights gives them) and
// the weights times the upstream gradient (C); then the R×B tile (T) and the
// R×⌈B/32⌉ near-pair mask (uint32); each row's hardest pairs (RowMining: 2
// per row, C and int64); for the cosine distance only, each row's exponent
// k (int) and the scaled embeddings (T, B×D).
struct Layout {
  int64_t stat, positive_weight, negative_weight, positive_coefficient, negative_coefficient, tile,
      mask, hardest_d, hardest_row, exponent, scaled, total;
};

Layout MakeLayout(const InBatchArgs& args) {
  const int64_t rows = args.rows;
  const int64_t element = ElementBytes(args.type);
  const int64_t block = BlockRows(args);
  Layout l;
  int64_t offset = 0;
  const auto take = [&offset](int64_t bytes) {
    const int64_t at = offset;
    offset += AlignUp(bytes);
    return at;
  };
  l.stat = take(rows * element);
  l.positive_weight = take(rows * int64_t{sizeof(double)});
  l.negative_weight = take(rows * int64_t{sizeof(double)});
  l.positive_coefficient = take(rows * element);
  l.negative_coefficient = take(rows * element);
  l.tile = take(block * rows * element);
  l.mask = take(block * MaskWords(rows) * int64_t{sizeof(uint32_t)});
  // O(B) next to the tile: not worth a workspace size that depends on the miner.
  l.hardest_d = take(2 * rows * element);
  l.hardest_row = take(2 * rows * int64_t{sizeof(int64_t)});
  const bool cosine = args.distance == Distance::kCosine;
  l.exponent = take(cosine ? rows * int64_t{sizeof(int)} : 0);
  l.scaled = take(cosine ? rows * args.dim * element : 0);
  l.total = offset;
  return l;
}

template <typename C>
__device__ inline C WarpSum(C value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kWholeWarp, value, offset);
  }
  return value;  // complete on lane 0 only
}

// The largest of the warp's values, on every lane; NaN is skipped (fmax),
// as std::max skips it in the CPU kernel's ScaleRows.
template <typename C>
__device__ inline C WarpMax(C value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmax(value, __shfl_xor_sync(kWholeWarp, value, offset));
  }
  return value;
}

// One warp per row: lane-strided partial sums, then a fixed shuffle tree.
// Cosine: the row is first divided by 2^k (cosine_row_exponent of its
// largest magnitude; exact, k = 0 for rows of moderate scale) into `scaled`,
// and k kept in `exponent`, so that the sums and the Gram tile are those of
// the CPU kernel.
template <Distance K, typename T>
__global__ void RowStatisticKernel(const T* __restrict__ e, int64_t rows, int64_t dim,
                                   ComputeType<T>* __restrict__ stat, int* __restrict__ exponent,
                                   T* __restrict__ scaled) {
  using C = ComputeType<T>;
  const int64_t warps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / kWarpSize; r < rows; r += warps * gridDim.x) {
    const T* row = e + r * dim;
    int scale_exponent = 0;
    if constexpr (K == Distance::kCosine) {
      C max_abs = 0;
      for (int64_t k = lane; k < dim; k += kWarpSize) {
        max_abs = fmax(max_abs, fabs(Convert<C>::from(row[k])));
      }
      scale_exponent = cosine_row_exponent(WarpMax(max_abs));
      if (lane == 0) exponent[r] = scale_exponent;
    }
    C sum = 0;
    for (int64_t k = lane; k < dim; k += kWarpSize) {
      C v = Convert<C>::from(row[k]);
      if constexpr (K == Distance::kCosine) {
        v = ldexp(v, -scale_exponent);
        scaled[r * dim + k] = Store<T>::to(v);
      }
      sum += v * v;
    }
    sum = WarpSum(sum);
    if (lane == 0) stat[r] = row_statistic<K>(sum);
  }
}

// The gradient of each scaled cosine row, back to the input's scale: the
// sweep computed it for the row divided by 2^k, so it is divided by 2^k.
template <typename T>
__global__ void UnscaleGradKernel(const int* __restrict__ exponent, int64_t rows, int64_t dim,
                                  T* __restrict__ grad) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < rows * dim;
       x += stride) {
    const int k = exponent[x / dim];
    if (k != 0) grad[x] = ldexp(grad[x], -k);
  }
}

// Anchors per block of the label count: each label read is compared with
// this many anchors, which divides the O(B²) reads by as much.
constexpr int kCountRows = 8;

// Per anchor (rows [anchor_begin, anchor_end)): the number of other rows with
// its label, the pair weights, and those weights times the upstream gradient
// (the CPU kernel's rounding: weight·g in double, then rounded to C). The
// partners' are zero-filled before. Counted weights ("active", or a miner's)
// are read, not written: the anchors' counting pass (PairRowKernel) has set
// them.
template <typename T>
__global__ void PairWeightKernel(const int64_t* __restrict__ labels, int64_t rows,
                                 int64_t anchor_begin, int64_t anchor_end, PairWeighting weighting,
                                 bool counted, const T* __restrict__ upstream,
                                 double* __restrict__ positive_weight,
                                 double* __restrict__ negative_weight,
                                 ComputeType<T>* __restrict__ positive_coefficient,
                                 ComputeType<T>* __restrict__ negative_coefficient) {
  using C = ComputeType<T>;
  __shared__ long long warp_counts[kCountRows][kThreadsPerBlock / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int64_t first = anchor_begin + static_cast<int64_t>(blockIdx.x) * kCountRows;
       first < anchor_end; first += static_cast<int64_t>(gridDim.x) * kCountRows) {
    int64_t anchor[kCountRows];
    long long count[kCountRows];
#pragma unroll
    for (int a = 0; a < kCountRows; ++a) {
      anchor[a] = first + a < anchor_end ? labels[first + a] : 0;
      count[a] = 0;
    }
    // Only balanced weights depend on the label counts: no O(B²) pass for others.
    const int64_t count_end = weighting == PairWeighting::kBalanced && !counted ? rows : 0;
    for (int64_t j = threadIdx.x; j < count_end; j += blockDim.x) {
      const int64_t label = labels[j];
#pragma unroll
      for (int a = 0; a < kCountRows; ++a) count[a] += label == anchor[a] && j != first + a;
    }
#pragma unroll
    for (int a = 0; a < kCountRows; ++a) {
      const long long total = WarpSum(count[a]);
      if (lane == 0) warp_counts[a][warp] = total;
    }
    __syncthreads();
    const int64_t i = first + threadIdx.x;
    if (threadIdx.x < kCountRows && i < anchor_end) {
      long long positives = 0;
      for (int w = 0; w < kThreadsPerBlock / kWarpSize; ++w) {
        positives += warp_counts[threadIdx.x][w];
      }
      double wp = positive_weight[i], wn = negative_weight[i];
      if (!counted) {
        pair_weights(weighting, static_cast<double>(rows), static_cast<double>(positives), 0.0, 0.0,
                     &wp, &wn);
        positive_weight[i] = wp;
        negative_weight[i] = wn;
      }
      if (upstream != nullptr) {
        const double g = Convert<double>::from(upstream[i]);
        positive_coefficient[i] = static_cast<C>(wp * g);
        negative_coefficient[i] = static_cast<C>(wn * g);
      }
    }
    // warp_counts is rewritten by the next anchors.
    __syncthreads();
  }
}

// The distance of a pair whose Gram form cancels, from e_i − e_j. One thread,
// sequential: such pairs are rare (duplicates, collapsed embeddings), and
// the CPU kernel's order of the sum is not reproduced anyway.
template <typename T>
__device__ inline ComputeType<T> DirectDistance(const T* ei, const T* ej, int64_t dim) {
  using C = ComputeType<T>;
  C squared = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const C diff = Convert<C>::from(ei[k]) - Convert<C>::from(ej[k]);
    squared += diff * diff;
  }
  return ElementOps<C>::sqrt(squared);
}

// One CUDA block per row i of the row block starting at row0, over row i's
// tile row S_i· (R×cols tile, stride cols: the pairs of row i with rows
// [col0, col0 + cols)). Computes loss_i (0 unless `anchors`) and, with kGrad,
// overwrites the tile row with M_i· (0 on the diagonal and for near pairs)
// and writes grad_i = q_i·e_i + Σ_near (A/d)·(e_i − e_j), to which the second
// GEMM then adds −M_i·E. The sums are in double, as the CPU kernel's.
// count ("active" or a miner: an anchors' pass without kGrad, against every
// row): row i's kept pairs are counted too (counted_pair), and its weights
// written from the counts before its loss; with a miner, its hardest pairs
// are found first. Each pair counts as row i keeps it and, for the
// gradient, as row j keeps it (miner_keeps).
template <Distance K, bool kGrad, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    PairRowKernel(const int64_t* __restrict__ labels, const T* __restrict__ e, int64_t col0,
                  int64_t cols, bool anchors, bool count, int64_t dim, int64_t row0,
                  const ComputeType<T>* __restrict__ stat, double* __restrict__ positive_weight,
                  double* __restrict__ negative_weight,
                  const ComputeType<T>* __restrict__ positive_coefficient,
                  const ComputeType<T>* __restrict__ negative_coefficient, ComputeType<T> margin,
                  ComputeType<T> positive_margin, RowMining<ComputeType<T>> mining,
                  T* __restrict__ tile, uint32_t* __restrict__ mask, T* __restrict__ loss,
                  T* __restrict__ grad) {
  using C = ComputeType<T>;
  constexpr bool kNear = kGrad && K == Distance::kEuclidean;
  const int64_t r = blockIdx.x;
  const int64_t i = row0 + r;
  T* s_row = tile + r * cols;
  uint32_t* mask_row = mask + r * MaskWords(cols);
  const T* ei = e + i * dim;
  const int64_t label_i = labels[i];
  const C stat_i = stat[i];
  C coefficient_i[2] = {};
  if constexpr (kGrad) {
    coefficient_i[0] = positive_coefficient[i];
    coefficient_i[1] = negative_coefficient[i];
  }
  // The pair's distance from its Gram entry s (Euclidean: from e_i − e_j
  // where the Gram form cancels, *near).
  const auto distance = [&](int64_t j, C s, bool* near) -> C {
    const C stat_j = stat[j];
    if constexpr (K == Distance::kEuclidean) {
      const C squared = euclidean_squared(s, stat_i, stat_j);
      *near = gram_distance_cancels(squared, stat_i, stat_j);
      return *near ? DirectDistance(ei, e + j * dim, dim) : ElementOps<C>::sqrt(squared);
    } else {
      *near = false;
      return pair_distance<K>(s, stat_i, stat_j);
    }
  };
  const bool mined = mining.miner != Miner::kNone;
  Hardest<C> hardest;
  if (mined && count) {
    Hardest<C> mine;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const int64_t j = col0 + c;
      bool near;
      if (j != i)
        mine.Offer(labels[j] == label_i, distance(j, Convert<C>::from(s_row[c]), &near), j);
    }
    hardest = BlockHardest(mine);
    for (int side = 0; threadIdx.x == 0 && side < 2; ++side) {
      mining.hardest_d[2 * i + side] = hardest.d[side];
      mining.hardest_row[2 * i + side] = hardest.row[side];
    }
  } else if (mined) {
    for (int side = 0; side < 2; ++side) {
      hardest.d[side] = mining.hardest_d[2 * i + side];
      hardest.row[side] = mining.hardest_row[2 * i + side];
    }
  }
  const C count_active = mining.weighting == PairWeighting::kActive ? C(1) : C(0);
  // Positive terms, negative terms, q_i / diagonal_factor, and with count
  // the counted positive and negative pairs.
  double sums[5] = {};
  bool direct_any = false;
  const int lane = threadIdx.x % kWarpSize;
  // The loop bound is the same on all lanes of a warp, so that whole warps
  // enter the ballot that writes the mask; c = base + lane walks the row's
  // 32-column words, each written by exactly one warp.
  for (int64_t base = static_cast<int64_t>(threadIdx.x) - lane; base < cols; base += blockDim.x) {
    const int64_t c = base + lane, j = col0 + c;
    bool near = false, direct = false;
    if (c < cols && j != i) {
      const C s = Convert<C>::from(s_row[c]);
      const C stat_j = stat[j];
      const C d = distance(j, s, &near);
      const bool same = labels[j] == label_i;
      C term, slope;
      if (same) {
        positive_term(d, positive_margin, &term, &slope);
      } else {
        negative_term(d, margin, &term, &slope);
      }
      // Without a miner both keeps are 1, and 1·x leaves the sums' bits.
      const C keep = miner_keeps(mining.miner, same, d, j, hardest.d, hardest.row, mining.epsilon);
      const C kept = masked(keep, term);
      sums[same ? 0 : 1] += static_cast<double>(kept);
      if (count) sums[same ? 3 : 4] += static_cast<double>(counted_pair(count_active, keep, kept));
      if constexpr (kGrad) {
        const C column_keep = miner_keeps(mining.miner, same, d, i, mining.hardest_d + 2 * j,
                                          mining.hardest_row + 2 * j, mining.epsilon);
        const C* column_coefficient = same ? positive_coefficient : negative_coefficient;
        const C sum = keep * coefficient_i[same ? 0 : 1] + column_keep * column_coefficient[j];
        const C coefficient = masked(keep + column_keep, sum * slope);
        const C m = gram_coefficient<K>(coefficient, d, stat_i, stat_j);
        // A near pair's m (A/d) is kept here only until the direct pass
        // below has used it; that pass then zeroes it for the GEMM. Near
        // pairs with m = 0 (equal rows: d = 0) skip that pass, which keeps
        // collapsed embeddings (all pairs near) cheap.
        s_row[c] = Store<T>::to(m);
        direct = near && m != C(0);
        if (!near) sums[2] += static_cast<double>(diagonal_term<K>(m, s));
      }
    } else if (kGrad && c < cols) {
      s_row[c] = T(0);
    }
    if constexpr (kNear) {
      const unsigned bits = __ballot_sync(kWholeWarp, direct);
      if (lane == 0) mask_row[base / kWarpSize] = bits;
      direct_any |= direct;
    }
  }
  BlockSums<5>(sums);
  if (count && threadIdx.x == 0) {
    mined_pair_weights(mining.weighting, sums[3], sums[4], &positive_weight[i],
                       &negative_weight[i]);
  }
  // A partner's sums hold its pairs with anchors: not a loss.
  if (loss != nullptr && threadIdx.x == 0) {
    loss[i] = anchors ? Store<T>::to(static_cast<C>(positive_weight[i] * sums[0] +
                                                    negative_weight[i] * sums[1]))
                      : T(0);
  }
  if constexpr (kGrad) {
    const C q = diagonal_factor<K>(stat_i) * static_cast<C>(sums[2]);
    T* gi = grad + i * dim;
    for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
      gi[k] = Store<T>::to(q * Convert<C>::from(ei[k]));
    }
    if constexpr (kNear) {
      // Also orders the mask and the near m's written above before their
      // reads below (a block barrier orders global memory within the block).
      if (__syncthreads_or(direct_any)) {
        const int64_t words = MaskWords(cols);
        // Every thread walks the whole mask, in increasing j, and updates its
        // own elements of grad_i: a fixed order per element, no races.
        for (int64_t w = 0; w < words; ++w) {
          for (uint32_t bits = mask_row[w]; bits != 0; bits &= bits - 1) {
            const int64_t c = w * kWarpSize + (__ffs(bits) - 1);
            const C m = Convert<C>::from(s_row[c]);
            const T* ej = e + (col0 + c) * dim;
            for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
              const C step = m * (Convert<C>::from(ei[k]) - Convert<C>::from(ej[k]));
              gi[k] = Store<T>::to(Convert<C>::from(gi[k]) + step);
            }
          }
        }
        __syncthreads();  // all reads of the near m's are done
        for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
          for (uint32_t bits = mask_row[w]; bits != 0; bits &= bits - 1) {
            s_row[w * kWarpSize + (__ffs(bits) - 1)] = T(0);
          }
        }
      }
    }
  }
}

// Enough warps for one row each, at most kMaxBlocks blocks (grid-stride).
int RowStatisticBlocks(int64_t rows) {
  const int64_t warps = kThreadsPerBlock / kWarpSize;
  return static_cast<int>(std::max<int64_t>(1, std::min(kMaxBlocks, (rows + warps - 1) / warps)));
}

int PairWeightBlocks(int64_t rows) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (rows + kCountRows - 1) / kCountRows)));
}

template <typename T>
GpuStatus ZeroFill(void* p, int64_t count, cudaStream_t stream) {
  if (p == nullptr || count == 0) return GpuStatus{};
  const cudaError_t error = cudaMemsetAsync(p, 0, count * sizeof(T), stream);
  return error == cudaSuccess ? GpuStatus{} : GpuStatus{cudaGetErrorString(error)};
}

template <typename T, Distance K, bool kGrad>
GpuStatus Sweep(const InBatchArgs& args, void* workspace, const GpuGemm& gemm,
                cudaStream_t stream) {
  using C = ComputeType<T>;
  const int64_t rows = args.rows, dim = args.dim;
  const Layout layout = MakeLayout(args);
  char* base = static_cast<char*>(workspace);
  auto* stat = reinterpret_cast<C*>(base + layout.stat);
  auto* positive_weight = reinterpret_cast<double*>(base + layout.positive_weight);
  auto* negative_weight = reinterpret_cast<double*>(base + layout.negative_weight);
  auto* positive_coefficient = reinterpret_cast<C*>(base + layout.positive_coefficient);
  auto* negative_coefficient = reinterpret_cast<C*>(base + layout.negative_coefficient);
  auto* tile = reinterpret_cast<T*>(base + layout.tile);
  auto* mask = reinterpret_cast<uint32_t*>(base + layout.mask);
  const RowMining<C> mining{args.miner, static_cast<C>(args.miner_epsilon), args.weighting,
                            reinterpret_cast<C*>(base + layout.hardest_d),
                            reinterpret_cast<int64_t*>(base + layout.hardest_row)};
  auto* exponent = reinterpret_cast<int*>(base + layout.exponent);
  auto* scaled = reinterpret_cast<T*>(base + layout.scaled);
  // From here on the sweep reads the scaled copy (cosine).
  const T* e = K == Distance::kCosine ? scaled : static_cast<const T*>(args.embeddings);
  T* grad = static_cast<T*>(args.grad);

  RowStatisticKernel<K><<<RowStatisticBlocks(rows), kThreadsPerBlock, 0, stream>>>(
      static_cast<const T*>(args.embeddings), rows, dim, stat, exponent, scaled);
  const int64_t anchor_begin = args.anchor_begin, anchor_end = args.anchor_end;
  GpuStatus status;
  // The partners' hardest pairs are never found, but read (times their zero
  // coefficients).
  if (args.miner != Miner::kNone) {
    status = ZeroFill<C>(mining.hardest_d, 2 * rows, stream);
    if (status.ok()) status = ZeroFill<int64_t>(mining.hardest_row, 2 * rows, stream);
    if (!status.ok()) return status;
  }
  if (anchor_end - anchor_begin < rows) {
    for (auto* weights : {positive_weight, negative_weight}) {
      if (status.ok()) status = ZeroFill<double>(weights, rows, stream);
    }
    for (auto* coefficients : {positive_coefficient, negative_coefficient}) {
      if (kGrad && status.ok()) status = ZeroFill<C>(coefficients, rows, stream);
    }
    if (!status.ok()) return status;
  }

  // Rows [first, last) against rows [col0, col0 + cols), with a gradient when
  // `pass` is std::true_type; `count` and the loss output as PairRowKernel's.
  const int64_t block = BlockRows(args);
  const auto sweep_rows = [&](auto pass, int64_t first, int64_t last, int64_t col0, int64_t cols,
                              bool anchors, bool count, T* loss) -> GpuStatus {
    constexpr bool kPassGrad = decltype(pass)::value;
    for (int64_t row0 = first; row0 < last; row0 += block) {
      const int64_t n = std::min(block, last - row0);
      // With dim 0 the Gram tile is zero; not left to the GEMM, whose k = 0
      // behaviour (cuBLAS: c = beta·c) is not every implementation's.
      GpuStatus result = dim > 0 && cols > 0 ? gemm(false, true, n, cols, dim, 1.0, e + row0 * dim,
                                                    dim, e + col0 * dim, dim, 0.0, tile, cols)
                                             : ZeroFill<T>(tile, n * cols, stream);
      if (!result.ok()) return result;
      PairRowKernel<K, kPassGrad><<<static_cast<unsigned>(n), kThreadsPerBlock, 0, stream>>>(
          args.labels, e, col0, cols, anchors, count, dim, row0, stat, positive_weight,
          negative_weight, positive_coefficient, negative_coefficient, static_cast<C>(args.margin),
          static_cast<C>(args.positive_margin), mining, tile, mask, loss, grad);
      result = LastError();
      if (!result.ok()) return result;
      // beta = 1: PairRowKernel has written q_i·e_i and the near pairs' terms.
      if (kPassGrad && dim > 0 && cols > 0) {
        result = gemm(false, false, n, dim, cols, -1.0, tile, cols, e + col0 * dim, dim, 1.0,
                      grad + row0 * dim, dim);
        if (!result.ok()) return result;
      }
    }
    return GpuStatus{};
  };
  T* loss = static_cast<T*>(args.loss);
  const std::bool_constant<kGrad> pass;
  // "active" and the miners: the anchors' forward pass counts their kept
  // pairs into their weights first (and finds their hardest pairs), and is
  // the loss's pass: the forward op and the gradient op then write the same
  // loss bits.
  const bool counted = args.weighting == PairWeighting::kActive || args.miner != Miner::kNone;
  if (counted) {
    status = sweep_rows(std::false_type{}, anchor_begin, anchor_end, 0, rows, true, true, loss);
    if (!status.ok()) return status;
  }
  if (kGrad || !counted) {
    PairWeightKernel<<<PairWeightBlocks(anchor_end - anchor_begin), kThreadsPerBlock, 0, stream>>>(
        args.labels, rows, anchor_begin, anchor_end, args.weighting, counted,
        kGrad ? static_cast<const T*>(args.upstream) : nullptr, positive_weight, negative_weight,
        positive_coefficient, negative_coefficient);
    status = LastError();
    if (status.ok()) {
      status = sweep_rows(pass, anchor_begin, anchor_end, 0, rows, true, false,
                          counted ? nullptr : loss);
    }
  }
  // The partners' own passes only give their gradient (their loss is 0):
  // without a gradient, or for rows from grad_rows on, they are zero-filled.
  const int64_t anchors = anchor_end - anchor_begin;
  const int64_t grad_end = kGrad ? args.grad_rows : anchor_end;
  if (status.ok()) {
    status = kGrad ? sweep_rows(pass, 0, anchor_begin, anchor_begin, anchors, false, false, loss)
                   : ZeroFill<T>(args.loss, anchor_begin, stream);
  }
  if (status.ok()) {
    status = sweep_rows(pass, anchor_end, grad_end, anchor_begin, anchors, false, false, loss);
  }
  for (T* out : {static_cast<T*>(args.loss), kGrad ? grad : nullptr}) {
    const int64_t width = out == grad ? dim : 1;
    if (status.ok() && out != nullptr) {
      status = ZeroFill<T>(out + grad_end * width, (rows - grad_end) * width, stream);
    }
  }
  if (!status.ok()) return status;
  if (K == Distance::kCosine && kGrad && dim > 0) {
    const int blocks = static_cast<int>(
        std::min(kMaxBlocks, (rows * dim + kThreadsPerBlock - 1) / kThreadsPerBlock));
    UnscaleGradKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(exponent, rows, dim, grad);
    return LastError();
  }
  return GpuStatus{};
}

// --- Keras reduction ---------------------------------------------------------
// g_i = w_i·reduction_scale, rounded to T as InBatchLossReducedCpu rounds it,
// so the sweep sees the CPU kernel's upstream gradient.
template <typename T>
__global__ void ReducedUpstreamKernel(const T* __restrict__ weights, bool scalar_weight,
                                      int64_t rows, const double* __restrict__ scale,
                                      T* __restrict__ upstream) {  // one per anchor
  const double s = *scale;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += stride) {
    upstream[i] = static_cast<T>(static_cast<double>(weights[scalar_weight ? 0 : i]) * s);
  }
}

// loss = Σ g_i·l_i in double, by one block (BlockSum, so blockDim.x is
// kReduceThreads): a fixed order, and O(B) next to the sweep's O(B²·D).
template <typename T>
__global__ void ReducedLossSumKernel(const T* __restrict__ upstream, const T* __restrict__ losses,
                                     int64_t rows, T* __restrict__ loss) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    sum += static_cast<double>(upstream[i]) * static_cast<double>(losses[i]);
  }
  const double total = BlockSum(sum);
  if (threadIdx.x == 0) *loss = static_cast<T>(total);
}

// The reduced launch's workspace: the weights' block sums (LaunchReductionScale),
// g and the per-anchor losses (T, rows each), then InBatchLossGpu's own.
struct ReducedLayout {
  int64_t weight_sums, upstream, losses, sweep, total;
};

ReducedLayout MakeReducedLayout(const InBatchReducedArgs& args) {
  const int64_t values = args.in.rows * ElementBytes(args.in.type);
  ReducedLayout l;
  l.weight_sums = 0;
  l.upstream = l.weight_sums + AlignUp(kMaxReduceBlocks * int64_t{sizeof(double)});
  l.losses = l.upstream + AlignUp(values);
  l.sweep = l.losses + AlignUp(values);
  l.total = l.sweep + InBatchLossGpuWorkspace(args.in);
  return l;
}

}  // namespace

int64_t InBatchLossGpuWorkspace(const InBatchArgs& args) {
  if (args.rows <= 1 || !IsInBatchDType(args.type)) return 0;
  return MakeLayout(args).total;
}

GpuStatus InBatchLossGpu(const InBatchArgs& args, void* workspace, const GpuGemm& gemm,
                         void* stream) {
  if (!IsInBatchDType(args.type) || !IsInBatchDistance(args.distance)) {
    return GpuStatus{"unsupported dtype or distance"};
  }
  auto s = static_cast<cudaStream_t>(stream);
  const bool grad = args.upstream != nullptr && args.grad != nullptr;
  GpuStatus status;
  VisitInBatchKernel(args.type, args.distance, [&](auto t_tag, auto k_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr Distance K = decltype(k_tag)::value;
    // The unused rows' outputs are 0, and so are those of a single used row:
    // it has no pairs (even a non-finite row, which the general path would
    // turn into 0·inf).
    const int64_t used = args.used_rows, zero_from = used == 1 ? 0 : used;
    if (args.loss != nullptr) {
      status = ZeroFill<T>(static_cast<T*>(args.loss) + zero_from, args.rows - zero_from, s);
    }
    if (status.ok() && grad) {
      status = ZeroFill<T>(static_cast<T*>(args.grad) + zero_from * args.dim,
                           (args.rows - zero_from) * args.dim, s);
    }
    if (!status.ok() || used <= 1) return;
    const InBatchArgs in = UsedRowsOnly(args);
    status = grad ? Sweep<T, K, true>(in, workspace, gemm, s)
                  : Sweep<T, K, false>(in, workspace, gemm, s);
  });
  return status;
}

int64_t InBatchLossReducedGpuWorkspace(const InBatchReducedArgs& args) {
  if (!IsInBatchDType(args.in.type)) return 0;
  return MakeReducedLayout(args).total;
}

// Runs for rows == 0 too: the loss (0) and the reduction scale are outputs.
GpuStatus InBatchLossReducedGpu(const InBatchReducedArgs& args, void* workspace,
                                const GpuGemm& gemm, void* stream) {
  if (!IsInBatchDType(args.in.type) || !IsInBatchDistance(args.in.distance)) {
    return GpuStatus{"unsupported dtype or distance"};
  }
  auto s = static_cast<cudaStream_t>(stream);
  const ReducedLayout layout = MakeReducedLayout(args);
  char* base = static_cast<char*>(workspace);
  // The weights, g and the reduced losses are the anchors'.
  const int64_t begin = args.in.anchor_begin, rows = args.in.anchor_end - begin;
  GpuStatus status;
  VisitDistanceDType(args.in.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const ReductionArgs& reduction = args.reduction;
      const T* w = static_cast<const T*>(reduction.weights);
      auto* upstream = reinterpret_cast<T*>(base + layout.upstream);
      auto* losses = reinterpret_cast<T*>(base + layout.losses);
      LaunchReductionScale<T>(reduction, rows, reinterpret_cast<double*>(base + layout.weight_sums),
                              s);
      if (rows > 0) {
        const int blocks = static_cast<int>(
            std::min(kMaxBlocks, (rows + kThreadsPerBlock - 1) / kThreadsPerBlock));
        ReducedUpstreamKernel<<<blocks, kThreadsPerBlock, 0, s>>>(
            w, reduction.scalar_weight, rows, reduction.reduction_scale, upstream + begin);
      }
      status = LastError();
      if (!status.ok()) return;
      InBatchArgs in = args.in;
      in.upstream = upstream;
      in.loss = losses;
      in.grad = args.grad;
      status = InBatchLossGpu(in, base + layout.sweep, gemm, stream);
      if (!status.ok()) return;
      ReducedLossSumKernel<<<1, kReduceThreads, 0, s>>>(upstream + begin, losses + begin, rows,
                                                        static_cast<T*>(reduction.loss));
      status = LastError();
    }
  });
  return status;
}

}  // namespace fused_contrastive
