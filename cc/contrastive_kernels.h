// Kernel entry points on raw pointers. No TensorFlow types: the TF OpKernels,
// the pybind11 module and the benchmarks all call these same functions.
#ifndef FUSED_CONTRASTIVE_CONTRASTIVE_KERNELS_H_
#define FUSED_CONTRASTIVE_CONTRASTIVE_KERNELS_H_

#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <new>
#include <string>

#include "contrastive_math.h"
#include "dtypes.h"

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

// Margins the loss is defined for (every entry point checks the same rule).
inline bool IsValidMargin(double margin) { return std::isfinite(margin) && margin >= 0; }

// Runs everything on the calling thread.
void SerialFor(int64_t n, const ElementCost& cost, const ShardFn& work);

// What every contrastive-loss kernel reads: n labels and n distances (device
// pointers for the GPU kernels), each aligned to its element type.
struct LossInputs {
  DType label_type;
  DType distance_type;
  const void* labels;
  const void* distances;
  int64_t n;
  double margin;
  int similar_label;  // the label value of a similar pair: 1 or 0
};

// One pass over the inputs writes the per-sample loss and d(loss)/d(distance),
// both of the distance dtype. loss/grad may alias distances/labels when the
// element types match: each element is read before it is written. Returns
// false (and does nothing) for an unsupported dtype pair.
bool ContrastiveLossCpu(const LossInputs& in, void* loss, void* grad,
                        const ParallelFor& parallel_for);

// The names the TF op's attr and the pybind11 module use for the Keras
// reductions of contrastive_math.h.
inline bool ParseReduction(const std::string& name, Reduction* out) {
  if (name == "sum") {
    *out = Reduction::kSum;
  } else if (name == "mean") {
    *out = Reduction::kMean;
  } else if (name == "weighted_mean") {
    *out = Reduction::kWeightedMean;
  } else {
    return false;
  }
  return true;
}

struct ReducedLossArgs {
  LossInputs in;
  const void* weights;  // distance_type: n values, or one when scalar_weight
  bool scalar_weight;
  Reduction reduction;
  double loss_scale;  // Keras' 1/replicas for means, else 1 (see reduction_scale)
  void* loss;         // out: one value of distance_type
  void* grad;         // out: n values, d(loss)/d(distance) with weight and divisor applied
  double* reduction_scale;  // out: one value, reduction_scale() of contrastive_math.h
};

// One pass over labels, distances and weights (plus one over the weights alone
// for kWeightedMean with per-element weights) gives the reduced loss and the
// fully scaled per-sample gradient. Sums accumulate in double, in fixed-size
// blocks added in a fixed order: the same inputs give the same bits whatever
// the thread count. False for an unsupported dtype pair.
bool ContrastiveLossReducedCpu(const ReducedLossArgs& args, const ParallelFor& parallel_for);

// out = in * scale (n values of `type`, computed as ComputeType); out may be in.
bool ScaleCpu(DType type, const void* in, double scale, int64_t n, void* out,
              const ParallelFor& parallel_for);

// Outcome of a GPU launch: error is null on success, else CUDA's message
// (static storage, never freed).
struct GpuStatus {
  const char* error = nullptr;
  bool ok() const { return error == nullptr; }
};

// The same computation as ContrastiveLossCpu on device pointers, enqueued on
// `stream` (a cudaStream_t; null is the legacy default stream). Returns after
// the launch, not after the kernel. Only in builds with CUDA.
GpuStatus ContrastiveLossGpu(const LossInputs& in, void* loss, void* grad, void* stream);

// Device scratch bytes ContrastiveLossReducedGpu needs for n elements. All of
// args' pointers are device pointers there, reduction_scale included.
int64_t ContrastiveLossReducedGpuWorkspace(int64_t n);

// ContrastiveLossReducedCpu on device pointers (args' weights, loss and grad
// included). Block sums are reduced in a fixed order: deterministic, though
// not bit-equal to the CPU's sums for kWeightedMean.
GpuStatus ContrastiveLossReducedGpu(const ReducedLossArgs& args, void* workspace, void* stream);

// out = in * scale[0], with the scalar scale in device memory.
GpuStatus ScaleGpu(DType type, const void* in, const void* scale, int64_t n, void* out,
                   void* stream);

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CONTRASTIVE_KERNELS_H_
