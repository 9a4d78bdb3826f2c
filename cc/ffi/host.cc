// What the typed-FFI handlers of every family share (ffi/host.h).

// Eigen's ThreadPoolDevice is only declared with this (its cost model shards
// the host calls' work).
#define EIGEN_USE_THREADS

#include "ffi/host.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>

#include "core/common/numeric_types.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace fused_contrastive {

bool FromFfi(ffi::DataType type, DType* out) {
  switch (type) {
    case ffi::DataType::PRED: *out = DType::kBool; return true;
    case ffi::DataType::S32: *out = DType::kInt32; return true;
    case ffi::DataType::S64: *out = DType::kInt64; return true;
    case ffi::DataType::F16: *out = DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = DType::kBFloat16; return true;
    case ffi::DataType::F32: *out = DType::kFloat32; return true;
    case ffi::DataType::F64: *out = DType::kFloat64; return true;
    default: return false;
  }
}

ffi::Error HostOutcome(KernelOutcome outcome) {
  if (outcome == KernelOutcome::kOutOfMemory) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, kKernelOutOfMemory);
  }
  if (outcome == KernelOutcome::kDone) return ffi::Error::Success();
  return ffi::Error::Internal("contrastive loss: a custom call has a dtype its kernel lacks");
}

// Sharded by Eigen's cost model as the OpKernels' pool shards. Any thread may
// claim the next shard, the caller included, so the call finishes even when
// no pool thread is free (the caller may be one); a task that starts after
// the last shard was claimed finds nothing to do, and keeps only `state`
// alive.
ParallelFor HostParallelFor(ffi::ThreadPool& pool) {
  const int threads = static_cast<int>(pool.num_threads());
  return [&pool, threads](int64_t n, const ElementCost& cost, const ShardFn& work) {
    const int64_t shards = std::min<int64_t>(
        n, Eigen::TensorCostModel<Eigen::ThreadPoolDevice>::numThreads(
               static_cast<double>(n),
               Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored, cost.compute_cycles),
               threads));
    if (shards <= 1) {
      if (n > 0) work(0, n);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::mutex mu;
      std::condition_variable all_done;
      int64_t done = 0;
    };
    const auto state = std::make_shared<State>();
    const int64_t shard_size = (n + shards - 1) / shards;
    const auto run_shards = [state, &work, n, shards, shard_size] {
      for (int64_t s; (s = state->next.fetch_add(1)) < shards;) {
        work(s * shard_size, std::min(n, (s + 1) * shard_size));
        std::lock_guard<std::mutex> lock(state->mu);
        if (++state->done == shards) state->all_done.notify_one();
      }
    };
    for (int64_t i = 1; i < shards; ++i) pool.Schedule(std::function<void()>(run_shards));
    run_shards();
    std::unique_lock<std::mutex> lock(state->mu);
    state->all_done.wait(lock, [&state, shards] { return state->done == shards; });
  };
}

void FillNan(ffi::AnyBuffer buffer) {
  DType type;
  if (!FromFfi(buffer.element_type(), &type)) return;
  VisitDistanceDType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::fill_n(static_cast<T*>(buffer.untyped_data()), buffer.element_count(),
                Store<T>::to(std::numeric_limits<ComputeType<T>>::quiet_NaN()));
  });
}

ReductionArgs HostReduction(ffi::AnyBuffer weights, ffi::BufferR0<ffi::F64> loss_scale,
                            ffi::Result<ffi::AnyBuffer> loss,
                            ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t reduction) {
  ReductionArgs out;
  out.weights = weights.untyped_data();
  out.scalar_weight = weights.dimensions().size() == 0;
  out.kind = static_cast<Reduction>(reduction);
  out.loss_scale = loss_scale.typed_data()[0];
  out.loss = loss->untyped_data();
  out.reduction_scale = static_cast<double*>(reduction_scale->untyped_data());
  return out;
}

}  // namespace fused_contrastive
