// Kernel entry points on raw pointers. No TensorFlow types: the TF OpKernels,
// the pybind11 module and the benchmarks all call these same functions.
#ifndef FUSED_CONTRASTIVE_CONTRASTIVE_KERNELS_H_
#define FUSED_CONTRASTIVE_CONTRASTIVE_KERNELS_H_

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

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

// Margins the loss is defined for (every entry point checks the same rule).
inline bool IsValidMargin(double margin) { return std::isfinite(margin) && margin >= 0; }

// Runs everything on the calling thread.
void SerialFor(int64_t n, const ElementCost& cost, const ShardFn& work);

// One pass over n labels and distances writes the per-sample loss and
// d(loss)/d(distance), both of the distance dtype. loss/grad may alias
// distances/labels when the element types match: each element is read before
// it is written. Returns false (and does nothing) for an unsupported dtype pair.
bool ContrastiveLossCpu(DType label_type, DType distance_type, const void* labels,
                        const void* distances, int64_t n, double margin, void* loss, void* grad,
                        const ParallelFor& parallel_for);

// The Keras reductions the fused-reduction kernels implement, divisor included:
// kSum divides by 1, kMean by n, kWeightedMean by the sum of the weights (by
// the weight itself when it is a single scalar, as Keras does). A zero divisor
// gives a zero loss and gradient (Keras' divide_no_nan).
enum class Reduction : int { kSum, kMean, kWeightedMean };

// The names the TF op's attr and the pybind11 module use.
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
  DType label_type;
  DType distance_type;
  const void* labels;
  const void* distances;
  const void* weights;  // distance_type: n values, or one when scalar_weight
  bool scalar_weight;
  int64_t n;
  double margin;
  Reduction reduction;
  double loss_scale;  // multiplies loss and gradient (Keras: 1/replicas for means)
  void* loss;            // out: one value of distance_type
  void* grad;            // out: n values, d(loss)/d(distance) with weight and divisor applied
  void* gradient_scale;  // out: one double, loss_scale / divisor (0 for a zero divisor)
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
GpuStatus ContrastiveLossGpu(DType label_type, DType distance_type, const void* labels,
                             const void* distances, int64_t n, double margin, void* loss,
                             void* grad, void* stream);

// Device scratch bytes ContrastiveLossReducedGpu needs for n elements. All of
// args' pointers are device pointers there, gradient_scale included.
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
