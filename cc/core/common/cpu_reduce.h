// Deterministic parallel sums shared by the CPU kernels (not a public header).
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_CPU_REDUCE_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_CPU_REDUCE_H_

#include <algorithm>
#include <vector>

#include "core/common/numeric_types.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"

namespace fused_contrastive {

// Sum over [0, n) of block_sum(begin, end) on blocks of `block` items, added
// in order. The blocks depend on n and `block` only, so the result does not
// depend on how many threads run them. element_cost is the cost of one item.
template <typename BlockSum>
double BlockedSum(int64_t n, int64_t block, const ElementCost& element_cost,
                  const ParallelFor& parallel_for, const BlockSum& block_sum) {
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> sums(blocks);
  const double scale = static_cast<double>(block);
  const ElementCost block_cost{element_cost.bytes_loaded * scale, element_cost.bytes_stored * scale,
                               element_cost.compute_cycles * scale};
  parallel_for(blocks, block_cost, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      sums[b] = block_sum(b * block, std::min(n, (b + 1) * block));
    }
  });
  double total = 0;
  for (double partial : sums) total += partial;
  return total;
}

// Elements per block of a reduction over per-element values.
constexpr int64_t kReductionBlock = 1 << 15;

// reduction_scale() of core/common/reduction.h for n losses with r's weights
// (of type D); reads the weights only for kWeightedMean.
template <typename D>
double CpuReductionScale(const ReductionArgs& r, int64_t n, const ParallelFor& parallel_for) {
  const D* w = static_cast<const D*>(r.weights);
  double weight_total = 0;
  if (r.kind == Reduction::kWeightedMean) {
    weight_total = r.scalar_weight ? Convert<double>::from(w[0])
                                   : BlockedSum(n, kReductionBlock, ElementCost{sizeof(D), 0, 1},
                                                parallel_for, [w](int64_t begin, int64_t end) {
                                                  double sum = 0;
#pragma omp simd reduction(+ : sum)
                                                  for (int64_t i = begin; i < end; ++i) {
                                                    sum += Convert<double>::from(w[i]);
                                                  }
                                                  return sum;
                                                });
  }
  return reduction_scale(r.kind, static_cast<double>(n), weight_total, r.loss_scale);
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_CPU_REDUCE_H_
