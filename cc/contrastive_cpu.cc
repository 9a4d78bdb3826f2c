#include "contrastive_kernels.h"
#include "contrastive_math.h"

namespace fused_contrastive {
namespace {

template <typename L, typename D>
void LossAndGradRange(const L* labels, const D* distances, int64_t begin, int64_t end,
                      ComputeType<D> margin, D* loss, D* grad) {
  using C = ComputeType<D>;
  // Straight-line body over plain arrays: GCC vectorises it for the 32/64-bit
  // types; the 16-bit conversions are integer bit work.
  for (int64_t i = begin; i < end; ++i) {
    C l, g;
    contrastive_loss_and_grad(Convert<C>::from(labels[i]), Convert<C>::from(distances[i]), margin,
                              &l, &g);
    loss[i] = Store<D>::to(l);
    grad[i] = Store<D>::to(g);
  }
}

}  // namespace

void SerialFor(int64_t n, const ElementCost&, const ShardFn& work) {
  if (n > 0) work(0, n);
}

bool ContrastiveLossCpu(DType label_type, DType distance_type, const void* labels,
                        const void* distances, int64_t n, double margin, void* loss, void* grad,
                        const ParallelFor& parallel_for) {
  return VisitLabelAndDistance(label_type, distance_type, [&](auto l_tag, auto d_tag) {
    using L = typename decltype(l_tag)::type;
    using D = typename decltype(d_tag)::type;
    const auto* y = static_cast<const L*>(labels);
    const auto* d = static_cast<const D*>(distances);
    auto* out_loss = static_cast<D*>(loss);
    auto* out_grad = static_cast<D*>(grad);
    const auto m = static_cast<ComputeType<D>>(margin);
    const ElementCost cost{double(sizeof(L) + sizeof(D)), double(2 * sizeof(D)), 12.0};
    parallel_for(n, cost, [=](int64_t begin, int64_t end) {
      LossAndGradRange(y, d, begin, end, m, out_loss, out_grad);
    });
  });
}

}  // namespace fused_contrastive
