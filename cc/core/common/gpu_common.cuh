// CUDA pieces shared by the .cu.cc kernel files (not a public header): vector
// accesses, the deterministic block reductions and the Keras reduction's
// divisor computed on the device.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_GPU_COMMON_CUH_
#define FUSED_CONTRASTIVE_CORE_COMMON_GPU_COMMON_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/common/formula.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"

namespace fused_contrastive {
// Unnamed: every .cu.cc file compiles its own copy of these kernels, so no
// __global__ symbol is shared between objects.
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough resident blocks to saturate any current GPU; a grid-stride loop
// covers the rest, so launches stay cheap for huge n.
constexpr int64_t kMaxBlocks = 8192;

// V consecutive elements loaded or stored as one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Reductions run on a grid whose size depends on n only, and every sum is
// combined in a fixed order, so results do not vary between runs or GPUs.
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxReduceBlocks = 1024;

// Scratch of a reduced-loss launch: the block sums of the loss, then those of
// the weights.
constexpr int64_t kReducedWorkspaceBytes = 2 * kMaxReduceBlocks * sizeof(double);

int64_t ReduceBlocks(int64_t n) {
  const int64_t blocks = (n + kReduceThreads - 1) / kReduceThreads;
  return std::max<int64_t>(1, std::min(kMaxReduceBlocks, blocks));
}

// Tree sum of one value per thread of the block; thread 0 gets the total.
__device__ double BlockSum(double value) {
  __shared__ double shared[kReduceThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  return shared[0];
}

template <typename D>
__global__ void WeightSumKernel(const D* __restrict__ weights, int64_t n, double* block_sums) {
  double sum = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    sum += Convert<double>::from(weights[i]);
  }
  const double total = BlockSum(sum);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

// Writes reduction_scale() for the main kernel.
template <typename D>
__global__ void ReductionScaleKernel(Reduction reduction, const D* weights, bool scalar_weight,
                                     int64_t n, const double* weight_block_sums, int blocks,
                                     double loss_scale, double* scale) {
  double partial = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) partial += weight_block_sums[b];
  const double weight_sum = BlockSum(partial);
  if (threadIdx.x != 0) return;
  const double weight_total = scalar_weight ? Convert<double>::from(weights[0]) : weight_sum;
  *scale = reduction_scale(reduction, static_cast<double>(n), weight_total, loss_scale);
}

// Enqueues the computation of reduction_scale() into *r.reduction_scale for n
// losses with r's weights (of type D); the weights are summed, into
// weight_sums (kMaxReduceBlocks values), only when they are the divisor.
template <typename D>
void LaunchReductionScale(const ReductionArgs& r, int64_t n, double* weight_sums,
                          cudaStream_t stream) {
  const D* w = static_cast<const D*>(r.weights);
  const bool weight_pass = r.kind == Reduction::kWeightedMean && !r.scalar_weight;
  const int blocks = static_cast<int>(ReduceBlocks(n));
  if (weight_pass) WeightSumKernel<<<blocks, kReduceThreads, 0, stream>>>(w, n, weight_sums);
  ReductionScaleKernel<<<1, kReduceThreads, 0, stream>>>(r.kind, w, r.scalar_weight, n, weight_sums,
                                                         weight_pass ? blocks : 0, r.loss_scale,
                                                         r.reduction_scale);
}

// loss = (sum of the main kernel's block sums) * scale.
template <typename D>
__global__ void FinishLossKernel(const double* block_sums, int blocks, const double* scale,
                                 D* loss) {
  double partial = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) partial += block_sums[b];
  const double total = BlockSum(partial);
  if (threadIdx.x == 0) *loss = Store<D>::to(static_cast<ComputeType<D>>(total * *scale));
}

GpuStatus LastError() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? GpuStatus{} : GpuStatus{cudaGetErrorString(error)};
}

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_GPU_COMMON_CUH_
