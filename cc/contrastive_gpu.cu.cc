// The CUDA launch of the contrastive loss. The math is contrastive_math.h,
// shared with the CPU kernel; this file adds only indexing, vector loads and
// the launch. Compiled with --fmad=false so a*b+c is not contracted into an FMA:
// GPU results then equal the CPU kernel's bit for bit.
#include <cuda_runtime.h>

#include <algorithm>

#include "contrastive_kernels.h"
#include "contrastive_math.h"

namespace fused_contrastive {
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

template <int V, typename L, typename D>
__global__ void ContrastiveLossKernel(const L* __restrict__ labels, const D* __restrict__ distances,
                                      int64_t n, ComputeType<D> margin, D* loss, D* grad) {
  using C = ComputeType<D>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / V;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<L, V> y = reinterpret_cast<const Pack<L, V>*>(labels)[p];
    const Pack<D, V> d = reinterpret_cast<const Pack<D, V>*>(distances)[p];
    Pack<D, V> out_loss, out_grad;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      C l, g;
      contrastive_loss_and_grad(Convert<C>::from(y.v[k]), Convert<C>::from(d.v[k]), margin, &l, &g);
      out_loss.v[k] = Store<D>::to(l);
      out_grad.v[k] = Store<D>::to(g);
    }
    reinterpret_cast<Pack<D, V>*>(loss)[p] = out_loss;
    reinterpret_cast<Pack<D, V>*>(grad)[p] = out_grad;
  }
  // The n % V tail, one element per thread.
  for (int64_t i = packs * V + first; i < n; i += stride) {
    C l, g;
    contrastive_loss_and_grad(Convert<C>::from(labels[i]), Convert<C>::from(distances[i]), margin,
                              &l, &g);
    loss[i] = Store<D>::to(l);
    grad[i] = Store<D>::to(g);
  }
}

bool Aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <int V, typename L, typename D>
void Launch(const L* labels, const D* distances, int64_t n, double margin, D* loss, D* grad,
            cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(n / V, 1);
  const int64_t blocks = std::min(kMaxBlocks, (work + kThreadsPerBlock - 1) / kThreadsPerBlock);
  ContrastiveLossKernel<V><<<static_cast<int>(blocks), kThreadsPerBlock, 0, stream>>>(
      labels, distances, n, static_cast<ComputeType<D>>(margin), loss, grad);
}

}  // namespace

GpuStatus ContrastiveLossGpu(DType label_type, DType distance_type, const void* labels,
                             const void* distances, int64_t n, double margin, void* loss,
                             void* grad, void* stream) {
  if (n == 0) return GpuStatus{};
  const bool supported = VisitLabelAndDistance(label_type, distance_type, [&](auto l_tag, auto d_tag) {
    using L = typename decltype(l_tag)::type;
    using D = typename decltype(d_tag)::type;
    // 16-byte accesses for the distance-typed streams (labels follow with the
    // same element count) whenever every pointer allows it.
    constexpr int V = 16 / sizeof(D);
    const auto* y = static_cast<const L*>(labels);
    const auto* d = static_cast<const D*>(distances);
    auto* out_loss = static_cast<D*>(loss);
    auto* out_grad = static_cast<D*>(grad);
    auto s = static_cast<cudaStream_t>(stream);
    if (Aligned(y, sizeof(Pack<L, V>)) && Aligned(d, sizeof(Pack<D, V>)) &&
        Aligned(out_loss, sizeof(Pack<D, V>)) && Aligned(out_grad, sizeof(Pack<D, V>))) {
      Launch<V>(y, d, n, margin, out_loss, out_grad, s);
    } else {
      Launch<1>(y, d, n, margin, out_loss, out_grad, s);
    }
  });
  if (!supported) return GpuStatus{"unsupported dtype pair"};
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? GpuStatus{} : GpuStatus{cudaGetErrorString(error)};
}

}  // namespace fused_contrastive
