// The CPU kernel's entry point (kernels.h's InBatchLossCpu, per instruction
// set): which sweeps of cpu_sweep.h run, in order, for the weighting and
// the miner. Compiled once per instruction set (cpu_generic.cc,
// cpu_avx2.cc, cpu_avx512.cc) inside the namespace FC_IN_BATCH_ISA. Not a
// public header.
#include <algorithm>

#include "core/in_batch/cpu_sweep.h"

namespace fused_contrastive {
namespace FC_IN_BATCH_ISA {
namespace {

// Runs the miner's statistics sweep (a sweep of its own, which computes
// nothing else) on the used rows of `args` and gives f the sweep.
template <typename T, Distance K, typename F>
void WithMinerStats(const InBatchArgs& args, const ParallelFor& parallel_for, F&& f) {
  InBatchArgs stats_args = args;
  stats_args.upstream = stats_args.loss = stats_args.grad = nullptr;
  Sweep<T, K, false> collector(stats_args, parallel_for, nullptr, nullptr, Role::kStats);
  collector.Run();
  f(collector);
}

// The miner's statistics (none without a miner).
template <typename T, Distance K>
MinerStats<T> CollectedStats(const InBatchArgs& args, const ParallelFor& parallel_for) {
  MinerStats<T> stats;
  if (args.miner != Miner::kNone) {
    WithMinerStats<T, K>(args, parallel_for,
                         [&](const auto& sweep) { stats = sweep.miner_stats(); });
  }
  return stats;
}

}  // namespace

bool InBatchLoss(const InBatchArgs& args, const ParallelFor& parallel_for) {
  return VisitInBatchKernel(args.type, args.distance, [&](auto t_tag, auto k_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr Distance K = decltype(k_tag)::value;
    // The unused rows' outputs are 0; the sweep sees the used rows only.
    const int64_t used_rows = args.used_rows, rows = args.rows;
    if (args.loss != nullptr) {
      std::fill(static_cast<T*>(args.loss) + used_rows, static_cast<T*>(args.loss) + rows, T(0));
    }
    if (args.grad != nullptr) {
      std::fill(static_cast<T*>(args.grad) + used_rows * args.dim,
                static_cast<T*>(args.grad) + rows * args.dim, T(0));
    }
    const InBatchArgs used = UsedRowsOnly(args);
    if (args.miner == Miner::kBatchHard) {
      // The statistics sweep, then the kept pairs directly.
      WithMinerStats<T, K>(used, parallel_for, [&](const auto& sweep) {
        BatchHardLoss<T, K>(used, sweep.prepared_rows(), sweep.miner_stats());
      });
      return;
    }
    InBatchArgs forward = used;
    forward.upstream = forward.grad = nullptr;
    // Weights from counts: a forward sweep counts the pairs first. It writes
    // the loss too, so that the forward op's and this op's loss bits agree
    // (the counting sweep's sums may round apart from the gradient sweep's).
    const bool counted = Sweep<T, K, false>::CountsPairs(args);
    PairCounts counts;
    MinerStats<T> stats;
    if (args.miner == Miner::kMultiSimilarity && FewPositivePairs(forward)) {
      Sweep<T, K, false> first(forward, parallel_for, nullptr, nullptr,
                               Role::kMultiSimilarityFirst);
      first.RunMultiSimilarityFirst();
      counts = first.pair_counts();
      stats = first.multi_similarity_stats();
    } else {
      stats = CollectedStats<T, K>(forward, parallel_for);
      if (counted || args.grad == nullptr) {
        Sweep<T, K, false> counter(forward, parallel_for, nullptr, &stats);
        counter.Run();
        counts = counter.pair_counts();
      }
    }
    if (args.grad != nullptr) {
      InBatchArgs sweep = used;
      if (counted) sweep.loss = nullptr;
      Sweep<T, K, true>(sweep, parallel_for, counted ? &counts : nullptr, &stats).Run();
    }
  });
}

}  // namespace FC_IN_BATCH_ISA
}  // namespace fused_contrastive
