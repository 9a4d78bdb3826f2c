// The CUDA launch of the contrastive loss. The math is core/common/formula.h,
// shared with the CPU kernel; this file adds only indexing, vector loads and
// the launch. Compiled with --fmad=false so a*b+c is not contracted into an FMA:
// GPU results then equal the CPU kernel's bit for bit.
#include <algorithm>

#include "core/common/formula.h"
#include "core/common/gpu_common.cuh"
#include "core/distances/kernels.h"

namespace fused_contrastive {
namespace {

template <int V, typename L, typename D>
__global__ void ContrastiveLossKernel(const L* __restrict__ labels, const D* __restrict__ distances,
                                      int64_t n, ComputeType<D> margin, int similar_label, D* loss,
                                      D* grad) {
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
      contrastive_loss_and_grad(Convert<C>::from(y.v[k]), Convert<C>::from(d.v[k]), margin,
                                similar_label, &l, &g);
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
                              similar_label, &l, &g);
    loss[i] = Store<D>::to(l);
    grad[i] = Store<D>::to(g);
  }
}

template <typename L, typename D>
__global__ void ReducedLossKernel(const L* __restrict__ labels, const D* __restrict__ distances,
                                  const D* __restrict__ weights, bool scalar_weight, int64_t n,
                                  ComputeType<D> margin, int similar_label, const double* scale,
                                  D* grad, double* block_sums) {
  using C = ComputeType<D>;
  const C scale_c = static_cast<C>(*scale);
  const C scalar = scalar_weight ? Convert<C>::from(weights[0]) : C(0);
  double sum = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    C l, g;
    contrastive_loss_and_grad(Convert<C>::from(labels[i]), Convert<C>::from(distances[i]), margin,
                              similar_label, &l, &g);
    const C w = scalar_weight ? scalar : Convert<C>::from(weights[i]);
    grad[i] = Store<D>::to(g * (w * scale_c));
    sum += static_cast<double>(l) * static_cast<double>(w);
  }
  const double total = BlockSum(sum);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

template <typename D>
__global__ void ScaleKernel(const D* in, const D* scale, int64_t n, D* out) {
  using C = ComputeType<D>;
  const C s = Convert<C>::from(*scale);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = Store<D>::to(Convert<C>::from(in[i]) * s);
  }
}

template <int V, typename L, typename D>
void Launch(const LossInputs& in, D* loss, D* grad, cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(in.n / V, 1);
  const int64_t blocks = std::min(kMaxBlocks, (work + kThreadsPerBlock - 1) / kThreadsPerBlock);
  ContrastiveLossKernel<V><<<static_cast<int>(blocks), kThreadsPerBlock, 0, stream>>>(
      static_cast<const L*>(in.labels), static_cast<const D*>(in.distances), in.n,
      static_cast<ComputeType<D>>(in.margin), in.similar_label, loss, grad);
}

}  // namespace

GpuStatus ContrastiveLossGpu(const LossInputs& in, void* loss, void* grad, void* stream) {
  if (in.n == 0) return GpuStatus{};
  const bool supported =
      VisitLabelAndDistance(in.label_type, in.distance_type, [&](auto l_tag, auto d_tag) {
        using L = typename decltype(l_tag)::type;
        using D = typename decltype(d_tag)::type;
        // 16-byte accesses for the distance-typed streams (labels follow with the
        // same element count) whenever every pointer allows it.
        constexpr int V = 16 / sizeof(D);
        auto* out_loss = static_cast<D*>(loss);
        auto* out_grad = static_cast<D*>(grad);
        auto s = static_cast<cudaStream_t>(stream);
        if (Aligned(in.labels, sizeof(Pack<L, V>)) && Aligned(in.distances, sizeof(Pack<D, V>)) &&
            Aligned(out_loss, sizeof(Pack<D, V>)) && Aligned(out_grad, sizeof(Pack<D, V>))) {
          Launch<V, L>(in, out_loss, out_grad, s);
        } else {
          Launch<1, L>(in, out_loss, out_grad, s);
        }
      });
  if (!supported) return GpuStatus{"unsupported dtype pair"};
  return LastError();
}

int64_t ContrastiveLossReducedGpuWorkspace(int64_t) { return kReducedWorkspaceBytes; }

GpuStatus ContrastiveLossReducedGpu(const ReducedLossArgs& a, void* workspace, void* stream) {
  const LossInputs& in = a.in;
  const int blocks = static_cast<int>(ReduceBlocks(in.n));
  double* loss_sums = static_cast<double*>(workspace);
  double* weight_sums = loss_sums + kMaxReduceBlocks;
  const ReductionArgs& reduction = a.reduction;
  double* scale = reduction.reduction_scale;
  auto s = static_cast<cudaStream_t>(stream);
  const bool supported =
      VisitLabelAndDistance(in.label_type, in.distance_type, [&](auto l_tag, auto d_tag) {
        using L = typename decltype(l_tag)::type;
        using D = typename decltype(d_tag)::type;
        const auto* w = static_cast<const D*>(reduction.weights);
        LaunchReductionScale<D>(reduction, in.n, weight_sums, s);
        ReducedLossKernel<<<blocks, kReduceThreads, 0, s>>>(
            static_cast<const L*>(in.labels), static_cast<const D*>(in.distances), w,
            reduction.scalar_weight, in.n, static_cast<ComputeType<D>>(in.margin), in.similar_label,
            scale, static_cast<D*>(a.grad), loss_sums);
        FinishLossKernel<<<1, kReduceThreads, 0, s>>>(loss_sums, blocks, scale,
                                                      static_cast<D*>(reduction.loss));
      });
  if (!supported) return GpuStatus{"unsupported dtype pair"};
  return LastError();
}

GpuStatus ScaleGpu(DType type, const void* in, const void* scale, int64_t n, void* out,
                   void* stream) {
  if (n == 0) return GpuStatus{};
  const bool supported = VisitDistanceDType(type, [&](auto tag) {
    using D = typename decltype(tag)::type;
    const int64_t blocks = std::min(kMaxBlocks, (n + kThreadsPerBlock - 1) / kThreadsPerBlock);
    auto s = static_cast<cudaStream_t>(stream);
    ScaleKernel<<<static_cast<int>(blocks), kThreadsPerBlock, 0, s>>>(
        static_cast<const D*>(in), static_cast<const D*>(scale), n, static_cast<D*>(out));
  });
  if (!supported) return GpuStatus{"unsupported dtype"};
  return LastError();
}

}  // namespace fused_contrastive
