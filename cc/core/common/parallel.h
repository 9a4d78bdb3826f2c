// How kernels run on the caller's threads (a ParallelFor each front end
// brings) and on a GPU stream (GpuStatus), and how they report running out of memory.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_PARALLEL_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_PARALLEL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <new>

namespace fused_contrastive {

// Per-element cost of a kernel, the unit TensorFlow's and Eigen's thread pools
// use to decide how many shards are worth their overhead (small inputs stay on
// the calling thread).
struct ElementCost {
  double bytes_loaded;
  double bytes_stored;
  double compute_cycles;
};

// Calls work(begin, end) on disjoint ranges covering [0, n), possibly in
// parallel, and returns when all are done. Each caller brings its own pool.
using ShardFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t n, const ElementCost& cost, const ShardFn& work)>;

// How a kernel call ended (RunKernel).
enum class KernelOutcome { kDone, kUnsupported, kOutOfMemory };

// Runs call(parallel_for) -- a kernel entry of this header's kind, returning
// false for dtypes it lacks -- and reports a std::bad_alloc anywhere in it as
// kOutOfMemory: on the calling thread, or in a shard on a pool thread, where
// it would end the process (and unwinding out of a pool's barrier would leave
// shards running on a dead frame). A shard that runs out of memory stops, and
// so do the shards after it; the call's outputs are then not to be used.
// Every caller of a kernel (OpKernels, XLA custom calls) goes through this.
template <typename Call>
KernelOutcome RunKernel(const ParallelFor& parallel_for, const Call& call) {
  std::atomic<bool> exhausted{false};
  try {
    const ParallelFor guarded = [&](int64_t n, const ElementCost& cost, const ShardFn& work) {
      parallel_for(n, cost, [&](int64_t begin, int64_t end) {
        if (exhausted.load(std::memory_order_relaxed)) return;
        try {
          work(begin, end);
        } catch (const std::bad_alloc&) {
          exhausted.store(true, std::memory_order_relaxed);
        }
      });
    };
    const bool supported = call(guarded);
    if (exhausted.load()) return KernelOutcome::kOutOfMemory;
    return supported ? KernelOutcome::kDone : KernelOutcome::kUnsupported;
  } catch (const std::bad_alloc&) {
    return KernelOutcome::kOutOfMemory;
  }
}

// The message of a kOutOfMemory outcome.
constexpr char kKernelOutOfMemory[] =
    "contrastive loss: out of memory for the kernel's scratch (reduce the batch)";

// Runs everything on the calling thread.
void SerialFor(int64_t n, const ElementCost& cost, const ShardFn& work);

// Outcome of a GPU launch: error is null on success, else CUDA's message
// (static storage, never freed).
struct GpuStatus {
  const char* error = nullptr;
  bool ok() const { return error == nullptr; }
};

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_PARALLEL_H_
