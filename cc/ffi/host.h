// What the typed-FFI handlers of every family (ffi/<family>.cc) share. They
// run the fused CPU kernels for the custom calls of TensorFlow's XLA CPU
// backend, where the lowerings emit them instead of HLO (HostCall in
// tf/xla/hlo.h), and of JAX's front end, on the pool XLA lends them
// (RunHostKernel). They see only XLA's FFI API, which TensorFlow's wheel and
// jaxlib both ship: no TensorFlow, no tf2xla (whose headers take about 40 s
// to compile per file).
#ifndef FUSED_CONTRASTIVE_FFI_HOST_H_
#define FUSED_CONTRASTIVE_FFI_HOST_H_

#include <cstdint>

#include "core/common/dtypes.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {

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

#endif  // FUSED_CONTRASTIVE_FFI_HOST_H_
