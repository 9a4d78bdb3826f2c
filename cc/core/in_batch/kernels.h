// Kernel entry points of the in-batch all-pairs contrastive loss
// (core/in_batch/math.h), on raw pointers, for the TF OpKernels, the XLA custom
// calls and the pybind11 module. No B×B matrix is ever stored: the kernels
// sweep the pairs in blocks of rows, with scratch linear in B.
#ifndef FUSED_CONTRASTIVE_CORE_IN_BATCH_KERNELS_H_
#define FUSED_CONTRASTIVE_CORE_IN_BATCH_KERNELS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/common/dtypes.h"
#include "core/common/formula.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"
#include "core/in_batch/math.h"

namespace fused_contrastive {

struct InBatchArgs {
  DType type;              // kFloat32 or kFloat64: embeddings, upstream, loss and grad
  const int64_t* labels;   // rows class ids
  const void* embeddings;  // rows * dim values, row-major
  int64_t rows;
  int64_t dim;
  // The anchors are rows [anchor_begin, anchor_end) (0 <= begin <= end <=
  // used_rows <= rows; all rows: today's batch). Each anchor pairs with every
  // other row below used_rows; the other rows there (the other replicas'
  // batches, references) are partners only: their loss is 0, their gradient
  // that of the anchors' pairs with them. Rows from used_rows on (a memory's
  // unfilled rows) take no part: loss and gradient 0. Partners from grad_rows
  // on (anchor_end <= grad_rows <= used_rows; a memory's rows) need no
  // gradient: theirs is 0, and the kernels skip its products.
  int64_t anchor_begin;
  int64_t anchor_end;
  int64_t used_rows;
  int64_t grad_rows;
  double margin;
  double positive_margin;
  Distance distance;  // one of kInBatchDistances
  PairWeighting weighting;
  // Which pairs count (math.h); multi_similarity's epsilon.
  Miner miner = Miner::kNone;
  double miner_epsilon = 0.1;
  int64_t max_block_rows;  // caps the rows per block; 0 leaves it to the kernel
  // d(objective)/d(loss_i), rows values (those of partners unused); null when
  // no gradient is wanted.
  const void* upstream;
  void* loss;  // out: rows per-anchor losses (0 for partners), or null
  void* grad;  // out: rows * dim values, d(objective)/d(embeddings); null without upstream
};

// What the kernels support; the callers check it first and report the problem.
inline bool IsInBatchDType(DType t) { return t == DType::kFloat32 || t == DType::kFloat64; }

// The problem with anchors [begin, end) of the first `used` of `rows` rows,
// the rows from `grad` on without gradient, for every front end's error;
// empty when there is none.
inline std::string InBatchAnchorsProblem(int64_t begin, int64_t end, int64_t grad, int64_t used,
                                         int64_t rows) {
  if (0 <= begin && begin <= end && end <= grad && grad <= used && used <= rows) return "";
  return "anchors must be [begin, end, grad, used] with 0 <= begin <= end <= grad <= used <= " +
         std::to_string(rows) + " (the rows), got [" + std::to_string(begin) + ", " +
         std::to_string(end) + ", " + std::to_string(grad) + ", " + std::to_string(used) + "]";
}

// The anchors input's values [begin, end, grad, used] into args (rows set);
// returns InBatchAnchorsProblem's message, empty when they are valid.
inline std::string SetInBatchAnchors(const int64_t* values, InBatchArgs* args) {
  args->anchor_begin = values[0];
  args->anchor_end = values[1];
  args->grad_rows = values[2];
  args->used_rows = values[3];
  return InBatchAnchorsProblem(values[0], values[1], values[2], values[3], args->rows);
}

// args with only its used rows: what the sweeps run on (the rows after them
// are zero-filled by the callers).
inline InBatchArgs UsedRowsOnly(InBatchArgs args) {
  args.rows = args.used_rows;
  return args;
}

// Calls f(TypeTag<T>{}, DistanceTag<K>{}) for a supported dtype and distance;
// false when there is none.
template <typename F>
bool VisitInBatchKernel(DType type, Distance distance, F&& f) {
  if (!IsInBatchDistance(distance)) return false;
  const auto visit_distance = [&](auto t) {
    VisitDistance(distance, [&](auto k) {
      if constexpr (decltype(k)::value != Distance::kManhattan) f(t, k);
    });
  };
  switch (type) {
    case DType::kFloat32: visit_distance(TypeTag<float>{}); return true;
    case DType::kFloat64: visit_distance(TypeTag<double>{}); return true;
    default: return false;
  }
}

// Loss and/or gradient in one sweep over the pairs. Each unordered pair of row
// blocks with an anchor block is visited once (d_ij = d_ji): the block
// products E_I·E_Jᵀ and the gradient's M_IJ·E_J, M_IJᵀ·E_I run as
// single-threaded GEMMs, the blocks in parallel on `parallel_for`, in a fixed
// schedule, so results do not depend on the thread count. Pairs of two
// partners are never computed. False for an unsupported dtype or distance.
bool InBatchLossCpu(const InBatchArgs& args, const ParallelFor& parallel_for);

// The Keras reduction of the per-anchor losses, with the fully scaled
// gradient, from one sweep: g_i = weight_i · reduction_scale (core/common/reduction.h)
// is the upstream gradient of anchor i's loss, the loss is Σ g_i·l_i (summed
// in double, in a fixed order), and the gradient d(loss)/d(embeddings) of
// every row. The weights are one per anchor (or one scalar), and the
// reduction's count is the anchors'.
struct InBatchReducedArgs {
  InBatchArgs in;           // upstream, loss and grad are set by the kernel
  ReductionArgs reduction;  // weights and loss of in.type
  void* grad;               // out: rows * dim values
};
bool InBatchLossReducedCpu(const InBatchReducedArgs& args, const ParallelFor& parallel_for);

// The instruction set the CPU kernel runs with on this machine: "avx512"
// (F, VL, DQ, BW, with FMA), else "avx2" (with FMA), else "generic", the
// first this CPU has. FUSED_CONTRASTIVE_CPU_ISA=avx2 or =generic caps the
// choice at that build (to test it, or to rule a better one out); a name
// that is none of these gives the generic build.
const char* InBatchCpuIsa();
// The builds this CPU can run, best first (InBatchCpuIsa's candidates).
std::vector<const char*> InBatchCpuBuilds();

// --- CUDA ----------------------------------------------------------------------
// A matrix product the caller supplies, enqueued on the kernel's stream:
// c = alpha·op(a)·op(b) + beta·c, all row-major, op(x) = xᵀ when trans_x,
// c is m×n, op(a) m×k, op(b) k×n; values of the args' dtype.
using GpuGemm = std::function<GpuStatus(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                        double alpha, const void* a, int64_t lda, const void* b,
                                        int64_t ldb, double beta, void* c, int64_t ldc)>;

// Device scratch bytes InBatchLossGpu needs (linear in rows; the cosine
// distance also holds a scaled copy of the embeddings, rows·dim values).
int64_t InBatchLossGpuWorkspace(const InBatchArgs& args);

// InBatchLossCpu on device pointers (labels, embeddings, upstream, loss and
// grad), on `stream`. Only in builds with CUDA.
GpuStatus InBatchLossGpu(const InBatchArgs& args, void* workspace, const GpuGemm& gemm,
                         void* stream);

// Device scratch bytes InBatchLossReducedGpu needs (linear in rows).
int64_t InBatchLossReducedGpuWorkspace(const InBatchReducedArgs& args);

// InBatchLossReducedCpu on device pointers (args.in's labels and embeddings,
// weights, loss, grad and reduction_scale), on `stream`: g_i and the weight
// sum are computed on the device, in a fixed order, so the stream is never
// waited on. Deterministic; the sums follow the GPU's own order, so results
// match the CPU kernel to rounding. Only in builds with CUDA.
GpuStatus InBatchLossReducedGpu(const InBatchReducedArgs& args, void* workspace,
                                const GpuGemm& gemm, void* stream);

// A GpuGemm of `type` (kFloat32 or kFloat64) on `stream` from a plain tiled
// kernel, for callers without cuBLAS (the pybind11 module: the GPU check
// machine has no TensorFlow, and the CUDA toolkit here no libcublas). Several
// times slower than cuBLAS; each entry of c is summed in increasing k.
// Only in builds with CUDA.
GpuGemm TiledGemmGpu(DType type, void* stream);

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_IN_BATCH_KERNELS_H_
