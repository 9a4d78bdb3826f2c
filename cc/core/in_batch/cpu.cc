// Picks the build of the in-batch CPU kernel (cpu_entry.h) that this
// CPU can run.
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <type_traits>

#include <vector>

#include "core/common/cpu_reduce.h"
#include "core/in_batch/kernels.h"

namespace fused_contrastive {
namespace generic {
bool InBatchLoss(const InBatchArgs& args, const ParallelFor& parallel_for);
}
#if FC_IN_BATCH_X86
namespace avx2 {
bool InBatchLoss(const InBatchArgs& args, const ParallelFor& parallel_for);
}
namespace avx512 {
bool InBatchLoss(const InBatchArgs& args, const ParallelFor& parallel_for);
}
#endif

namespace {

struct Build {
  const char* name;
  bool (*supported)();
  bool (*loss)(const InBatchArgs&, const ParallelFor&);
};

// Best first; each build's instruction sets are its compile flags'.
constexpr Build kBuilds[] = {
#if FC_IN_BATCH_X86
    {"avx512",
     [] {
       return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
     },
     avx512::InBatchLoss},
    {"avx2", [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); },
     avx2::InBatchLoss},
#endif
    {"generic", [] { return true; }, generic::InBatchLoss},
};

// The best build this CPU runs, no better than FUSED_CONTRASTIVE_CPU_ISA
// names (a cap, so that a test or a user can rule a build out).
const Build& Chosen() {
  static const Build& chosen = []() -> const Build& {
    const char* cap = std::getenv("FUSED_CONTRASTIVE_CPU_ISA");
    bool allowed = cap == nullptr;
    for (const Build& build : kBuilds) {
      allowed = allowed || std::strcmp(cap, build.name) == 0;
      if (allowed && build.supported()) return build;
    }
    return kBuilds[std::size(kBuilds) - 1];
  }();
  return chosen;
}

}  // namespace

const char* InBatchCpuIsa() { return Chosen().name; }

std::vector<const char*> InBatchCpuBuilds() {
  std::vector<const char*> names;
  for (const Build& build : kBuilds) {
    if (build.supported()) names.push_back(build.name);
  }
  return names;
}

bool InBatchLossCpu(const InBatchArgs& args, const ParallelFor& parallel_for) {
  return Chosen().loss(args, parallel_for);
}

bool InBatchLossReducedCpu(const InBatchReducedArgs& args, const ParallelFor& parallel_for) {
  if (!IsInBatchDType(args.in.type)) return false;
  bool ok = false;
  VisitDistanceDType(args.in.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const int64_t rows = args.in.rows;
      const int64_t begin = args.in.anchor_begin, anchors = args.in.anchor_end - begin;
      const ReductionArgs& reduction = args.reduction;
      const T* w = static_cast<const T*>(reduction.weights);
      const double scale = CpuReductionScale<T>(reduction, anchors, parallel_for);
      std::vector<T> upstream(rows, T(0));
      std::vector<T> losses(rows);
      for (int64_t a = 0; a < anchors; ++a) {
        upstream[begin + a] =
            static_cast<T>(static_cast<double>(w[reduction.scalar_weight ? 0 : a]) * scale);
      }
      InBatchArgs in = args.in;
      in.upstream = upstream.data();
      in.loss = losses.data();
      in.grad = args.grad;
      ok = InBatchLossCpu(in, parallel_for);
      double total = 0;
      for (int64_t i = begin; i < begin + anchors; ++i) {
        total += static_cast<double>(upstream[i]) * static_cast<double>(losses[i]);
      }
      *static_cast<T*>(reduction.loss) = static_cast<T>(total);
      *reduction.reduction_scale = scale;
    }
  });
  return ok;
}

}  // namespace fused_contrastive
