// What the host calls of every family share. On XLA's CPU backend the
// embedding and in-batch ops are typed-FFI custom calls of the fused CPU
// kernels rather than HLO: the lowerings emit them (HostCall), and the
// handlers run the kernels on the pool XLA lends them (RunHostKernel).
#ifndef FUSED_CONTRASTIVE_TF_XLA_HOST_CALLS_H_
#define FUSED_CONTRASTIVE_TF_XLA_HOST_CALLS_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "core/common/dtypes.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "xla/ffi/api/ffi.h"
#include "xla/hlo/builder/xla_builder.h"

namespace fused_contrastive {

// --- Lowering side ---------------------------------------------------------------

// FUSED_CONTRASTIVE_XLA_CPU_HLO=1 keeps the HLO lowering on the CPU backend
// too, so that the GPU backend's lowering is tested where there is no GPU
// (the XLA tests rerun so in a subprocess).
bool HloOnCpu();

// A typed-FFI custom call of `target`; returns its results, of `shapes`.
// attrs become the MLIR dictionary XLA decodes for the handler's Attr<int32_t>.
std::vector<xla::XlaOp> HostCall(tensorflow::XlaOpKernelContext* ctx, const char* target,
                                 const std::vector<xla::XlaOp>& operands,
                                 const std::vector<xla::Shape>& shapes,
                                 const std::vector<std::pair<const char*, int>>& attrs);

// --- Handler side ------------------------------------------------------------------

namespace ffi = ::xla::ffi;

bool FromFfi(ffi::DataType type, DType* out);

// How RunKernel's outcome reads to XLA: the lowerings only emit calls for
// dtypes the kernels support (the op definitions' lists), so a miss is a
// build defect, as in the OpKernels.
ffi::Error HostOutcome(KernelOutcome outcome);

// ParallelFor on the intra-op pool XLA lends FFI handlers.
ParallelFor HostParallelFor(ffi::ThreadPool& pool);

// Runs a kernel entry on XLA's pool (RunKernel) once the handler has read its
// operands (`read`: false for a dtype the kernels lack).
template <typename Call>
ffi::Error RunHostKernel(ffi::ThreadPool& pool, bool read, const Call& call) {
  return HostOutcome(read ? RunKernel(HostParallelFor(pool), call) : KernelOutcome::kUnsupported);
}

// Sets every value of `buffer` (of a floating-point dtype) to NaN.
void FillNan(ffi::AnyBuffer buffer);

// A reduced handler's ReductionArgs from its sample_weight and loss_scale
// operands, its loss and reduction_scale results and its reduction attr.
ReductionArgs HostReduction(ffi::AnyBuffer weights, ffi::BufferR0<ffi::F64> loss_scale,
                            ffi::Result<ffi::AnyBuffer> loss,
                            ffi::Result<ffi::AnyBuffer> reduction_scale, int32_t reduction);

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_XLA_HOST_CALLS_H_
