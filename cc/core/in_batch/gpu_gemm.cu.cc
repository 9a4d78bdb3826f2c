// TiledGemmGpu (core/in_batch/kernels.h): the in-batch sweep's GEMMs where no
// cuBLAS is at hand (the pybind11 module on the GPU check machine).
#include <algorithm>
#include <type_traits>

#include "core/common/gpu_common.cuh"
#include "core/in_batch/kernels.h"

namespace fused_contrastive {
namespace {

// Each block computes 64×64 tiles of c, 16 values of k at a time through
// shared memory; each thread a 4×4 register block whose rows and columns are
// 16 apart, so that the shared-memory reads of a warp are broadcasts or
// consecutive words (no bank conflicts).
constexpr int kGemmTile = 64;
constexpr int kGemmTileK = 16;
constexpr int kGemmThreads = 256;
constexpr int kGemmPerThread = kGemmTile / 16;  // 16×16 threads
// Tiles per launch beyond which blocks loop (grid-stride over tiles).
constexpr int64_t kMaxGemmBlocks = int64_t{1} << 20;

template <bool kTransA, bool kTransB, typename T>
__global__ void __launch_bounds__(kGemmThreads)
    TiledGemmKernel(int64_t m, int64_t n, int64_t k, T alpha, const T* __restrict__ a, int64_t lda,
                    const T* __restrict__ b, int64_t ldb, T beta, T* c, int64_t ldc,
                    int64_t tiles_n, int64_t tiles) {
  // +1 column: the non-transposed loads store down a column of these arrays;
  // the padding spreads them over the banks.
  __shared__ T a_tile[kGemmTileK][kGemmTile + 1];
  __shared__ T b_tile[kGemmTileK][kGemmTile + 1];
  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile / tiles_n * kGemmTile;
    const int64_t col0 = tile % tiles_n * kGemmTile;
    T acc[kGemmPerThread][kGemmPerThread] = {};
    for (int64_t k0 = 0; k0 < k; k0 += kGemmTileK) {
      // Loads walk the contiguous dimension of each operand across threads,
      // so that a warp's global reads coalesce.
#pragma unroll
      for (int p = 0; p < kGemmTile * kGemmTileK / kGemmThreads; ++p) {
        const int row = kTransA ? t % kGemmTile : t / kGemmTileK + p * (kGemmThreads / kGemmTileK);
        const int kk = kTransA ? t / kGemmTile + p * (kGemmThreads / kGemmTile) : t % kGemmTileK;
        const int64_t gi = row0 + row, gk = k0 + kk;
        a_tile[kk][row] = gi < m && gk < k ? a[kTransA ? gk * lda + gi : gi * lda + gk] : T(0);
      }
#pragma unroll
      for (int p = 0; p < kGemmTile * kGemmTileK / kGemmThreads; ++p) {
        const int col = kTransB ? t / kGemmTileK + p * (kGemmThreads / kGemmTileK) : t % kGemmTile;
        const int kk = kTransB ? t % kGemmTileK : t / kGemmTile + p * (kGemmThreads / kGemmTile);
        const int64_t gj = col0 + col, gk = k0 + kk;
        b_tile[kk][col] = gj < n && gk < k ? b[kTransB ? gj * ldb + gk : gk * ldb + gj] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kGemmTileK; ++kk) {
        T av[kGemmPerThread], bv[kGemmPerThread];
#pragma unroll
        for (int x = 0; x < kGemmPerThread; ++x) {
          av[x] = a_tile[kk][ty + 16 * x];
          bv[x] = b_tile[kk][tx + 16 * x];
        }
#pragma unroll
        for (int y = 0; y < kGemmPerThread; ++y) {
#pragma unroll
          for (int x = 0; x < kGemmPerThread; ++x) acc[y][x] += av[y] * bv[x];
        }
      }
      // The tiles are overwritten by the next step.
      __syncthreads();
    }
#pragma unroll
    for (int y = 0; y < kGemmPerThread; ++y) {
      const int64_t gi = row0 + ty + 16 * y;
      if (gi >= m) continue;
#pragma unroll
      for (int x = 0; x < kGemmPerThread; ++x) {
        const int64_t gj = col0 + tx + 16 * x;
        if (gj >= n) continue;
        T* out = c + gi * ldc + gj;
        // BLAS: with beta = 0, c is not read (it may hold NaN).
        *out = beta == T(0) ? alpha * acc[y][x] : alpha * acc[y][x] + beta * *out;
      }
    }
  }
}

template <typename T>
GpuStatus TiledGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                    const void* a, int64_t lda, const void* b, int64_t ldb, double beta, void* c,
                    int64_t ldc, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return GpuStatus{};
  const int64_t tiles_n = (n + kGemmTile - 1) / kGemmTile;
  const int64_t tiles = (m + kGemmTile - 1) / kGemmTile * tiles_n;
  const int blocks = static_cast<int>(std::min(tiles, kMaxGemmBlocks));
  const auto launch = [&](auto ta, auto tb) {
    TiledGemmKernel<decltype(ta)::value, decltype(tb)::value><<<blocks, kGemmThreads, 0, stream>>>(
        m, n, k, static_cast<T>(alpha), static_cast<const T*>(a), lda, static_cast<const T*>(b),
        ldb, static_cast<T>(beta), static_cast<T*>(c), ldc, tiles_n, tiles);
  };
  using False = std::false_type;
  using True = std::true_type;
  if (trans_a) {
    trans_b ? launch(True{}, True{}) : launch(True{}, False{});
  } else {
    trans_b ? launch(False{}, True{}) : launch(False{}, False{});
  }
  return LastError();
}

}  // namespace

GpuGemm TiledGemmGpu(DType type, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return [type, s](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                   const void* a, int64_t lda, const void* b, int64_t ldb, double beta, void* c,
                   int64_t ldc) -> GpuStatus {
    switch (type) {
      case DType::kFloat32:
        return TiledGemm<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, s);
      case DType::kFloat64:
        return TiledGemm<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, s);
      default: return GpuStatus{"TiledGemmGpu: unsupported dtype"};
    }
  };
}

}  // namespace fused_contrastive
