// Reductions over one row's pairs in the CUDA in-batch kernel (gpu.cu.cc),
// where a CUDA block owns a row: its sums, and for the miners its hardest
// pairs (found in the counting pass) with the per-row values the passes
// read them from. Not a public header.
#pragma once

#include <math.h>

#include <cstdint>

#include "core/common/gpu_common.cuh"
#include "core/in_batch/math.h"

namespace fused_contrastive {
namespace {

// Totals of N per-thread values over the block (kThreadsPerBlock threads),
// every thread getting them: a fixed tree, so deterministic.
template <int N>
__device__ inline void BlockSums(double* v) {
  __shared__ double shared[N][kThreadsPerBlock];
  for (int s = 0; s < N; ++s) shared[s][threadIdx.x] = v[s];
  __syncthreads();
  for (int width = kThreadsPerBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      for (int s = 0; s < N; ++s) shared[s][threadIdx.x] += shared[s][threadIdx.x + width];
    }
    __syncthreads();
  }
  for (int s = 0; s < N; ++s) v[s] = shared[s][0];
}

// The miner's values for PairRowKernel. hardest_d and hardest_row hold each
// row's hardest positive's distance and row, then its hardest negative's
// (2 per row), which the counting pass writes for the anchors and the
// gradient passes read for every row's partners (miner_keeps).
template <typename C>
struct RowMining {
  Miner miner;
  C epsilon;
  PairWeighting weighting;  // the counting pass's weights (mined_pair_weights)
  C* hardest_d;
  int64_t* hardest_row;
};

// An anchor's hardest positive and negative so far (harder_pair's order).
template <typename C>
struct Hardest {
  C d[2] = {C(-INFINITY), C(INFINITY)};
  int64_t row[2] = {-1, -1};

  __device__ void Offer(bool positive, C distance, int64_t j) {
    const int side = positive ? 0 : 1;
    if (harder_pair(positive, distance, j, d[side], row[side])) {
      d[side] = distance;
      row[side] = j;
    }
  }
};

// The block's hardest pairs from each thread's own: a tree in shared memory,
// every thread getting the result. harder_pair is a total order (ties to
// the lowest row), so the result does not depend on the tree's shape.
template <typename C>
__device__ inline Hardest<C> BlockHardest(const Hardest<C>& mine) {
  __shared__ C shared_d[2][kThreadsPerBlock];
  __shared__ int64_t shared_row[2][kThreadsPerBlock];
  for (int side = 0; side < 2; ++side) {
    shared_d[side][threadIdx.x] = mine.d[side];
    shared_row[side][threadIdx.x] = mine.row[side];
  }
  __syncthreads();
  for (int width = kThreadsPerBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      for (int side = 0; side < 2; ++side) {
        const int other = threadIdx.x + width;
        if (harder_pair(side == 0, shared_d[side][other], shared_row[side][other],
                        shared_d[side][threadIdx.x], shared_row[side][threadIdx.x])) {
          shared_d[side][threadIdx.x] = shared_d[side][other];
          shared_row[side][threadIdx.x] = shared_row[side][other];
        }
      }
    }
    __syncthreads();
  }
  Hardest<C> all;
  for (int side = 0; side < 2; ++side) {
    all.d[side] = shared_d[side][0];
    all.row[side] = shared_row[side][0];
  }
  return all;
}

}  // namespace
}  // namespace fused_contrastive
