// Kernel entry points on raw pointers. No TensorFlow types: the TF OpKernels,
// the pybind11 module and the benchmarks all call these same functions.
#ifndef FUSED_CONTRASTIVE_CORE_DISTANCES_KERNELS_H_
#define FUSED_CONTRASTIVE_CORE_DISTANCES_KERNELS_H_

#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <new>
#include <string>

#include "core/common/dtypes.h"
#include "core/common/formula.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"

namespace fused_contrastive {

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

struct ReducedLossArgs {
  LossInputs in;
  ReductionArgs reduction;  // weights and loss of distance_type, n weights unless scalar
  void* grad;               // out: n values, d(loss)/d(distance) with weight and divisor applied
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

#endif  // FUSED_CONTRASTIVE_CORE_DISTANCES_KERNELS_H_
