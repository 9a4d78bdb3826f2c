#include <algorithm>

#include "core/common/cpu_reduce.h"
#include "core/common/formula.h"
#include "core/distances/kernels.h"

namespace fused_contrastive {
namespace {

template <typename L, typename D>
void LossAndGradRange(const L* labels, const D* distances, int64_t begin, int64_t end,
                      ComputeType<D> margin, int similar_label, D* loss, D* grad) {
  using C = ComputeType<D>;
  // Straight-line body over plain arrays: GCC vectorises it for the 32/64-bit
  // types (similar_label is loop-invariant and gets unswitched); the 16-bit
  // conversions are integer bit work.
  for (int64_t i = begin; i < end; ++i) {
    C l, g;
    contrastive_loss_and_grad(Convert<C>::from(labels[i]), Convert<C>::from(distances[i]), margin,
                              similar_label, &l, &g);
    loss[i] = Store<D>::to(l);
    grad[i] = Store<D>::to(g);
  }
}

// Sum of w*loss over [begin, end), writing grad = dloss * w * scale.
// `omp simd` lets the chunk sums vectorise; their lane-wise order is fixed for
// a given binary, so results stay deterministic.
template <bool kScalarWeight, typename L, typename D>
double WeightedLossAndGradRange(const L* labels, const D* distances, const D* weights,
                                int64_t begin, int64_t end, ComputeType<D> margin,
                                int similar_label, ComputeType<D> scale, D* grad) {
  using C = ComputeType<D>;
  const C scalar_weight = kScalarWeight ? Convert<C>::from(weights[0]) : C(0);
  double sum = 0;
  for (int64_t chunk = begin; chunk < end; chunk += kFloatSumChunk) {
    const int64_t stop = std::min(end, chunk + kFloatSumChunk);
    C chunk_sum = 0;
#pragma omp simd reduction(+ : chunk_sum)
    for (int64_t i = chunk; i < stop; ++i) {
      C l, g;
      contrastive_loss_and_grad(Convert<C>::from(labels[i]), Convert<C>::from(distances[i]), margin,
                                similar_label, &l, &g);
      const C w = kScalarWeight ? scalar_weight : Convert<C>::from(weights[i]);
      grad[i] = Store<D>::to(g * (w * scale));
      chunk_sum += l * w;
    }
    sum += static_cast<double>(chunk_sum);
  }
  return sum;
}

}  // namespace

bool ContrastiveLossCpu(const LossInputs& in, void* loss, void* grad,
                        const ParallelFor& parallel_for) {
  return VisitLabelAndDistance(in.label_type, in.distance_type, [&](auto l_tag, auto d_tag) {
    using L = typename decltype(l_tag)::type;
    using D = typename decltype(d_tag)::type;
    const auto* y = static_cast<const L*>(in.labels);
    const auto* d = static_cast<const D*>(in.distances);
    auto* out_loss = static_cast<D*>(loss);
    auto* out_grad = static_cast<D*>(grad);
    const auto m = static_cast<ComputeType<D>>(in.margin);
    const int similar_label = in.similar_label;
    const ElementCost cost{double(sizeof(L) + sizeof(D)), double(2 * sizeof(D)), 12.0};
    parallel_for(in.n, cost, [=](int64_t begin, int64_t end) {
      LossAndGradRange(y, d, begin, end, m, similar_label, out_loss, out_grad);
    });
  });
}

bool ContrastiveLossReducedCpu(const ReducedLossArgs& a, const ParallelFor& parallel_for) {
  const LossInputs& in = a.in;
  return VisitLabelAndDistance(in.label_type, in.distance_type, [&](auto l_tag, auto d_tag) {
    using L = typename decltype(l_tag)::type;
    using D = typename decltype(d_tag)::type;
    using C = ComputeType<D>;
    const auto* y = static_cast<const L*>(in.labels);
    const auto* d = static_cast<const D*>(in.distances);
    const ReductionArgs& reduction = a.reduction;
    const auto* w = static_cast<const D*>(reduction.weights);
    auto* grad = static_cast<D*>(a.grad);

    const double scale = CpuReductionScale<D>(reduction, in.n, parallel_for);
    *reduction.reduction_scale = scale;
    const C m = static_cast<C>(in.margin);
    const C scale_c = static_cast<C>(scale);
    const int similar_label = in.similar_label;
    const ElementCost cost{double(sizeof(L) + sizeof(D) * (reduction.scalar_weight ? 1 : 2)),
                           double(sizeof(D)), 14.0};
    const double sum =
        BlockedSum(in.n, kReductionBlock, cost, parallel_for, [&](int64_t begin, int64_t end) {
          return reduction.scalar_weight
                     ? WeightedLossAndGradRange<true>(y, d, w, begin, end, m, similar_label,
                                                      scale_c, grad)
                     : WeightedLossAndGradRange<false>(y, d, w, begin, end, m, similar_label,
                                                       scale_c, grad);
        });
    *static_cast<D*>(reduction.loss) = Store<D>::to(static_cast<C>(sum * scale));
  });
}

bool ScaleCpu(DType type, const void* in, double scale, int64_t n, void* out,
              const ParallelFor& parallel_for) {
  return VisitDistanceDType(type, [&](auto tag) {
    using D = typename decltype(tag)::type;
    using C = ComputeType<D>;
    const auto* x = static_cast<const D*>(in);
    auto* y = static_cast<D*>(out);
    const C s = static_cast<C>(scale);
    parallel_for(n, ElementCost{sizeof(D), sizeof(D), 1}, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) y[i] = Store<D>::to(Convert<C>::from(x[i]) * s);
    });
  });
}

}  // namespace fused_contrastive
