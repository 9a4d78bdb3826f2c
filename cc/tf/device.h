// The OpKernels' device adapters: the op's intra-op pool as the kernels'
// ParallelFor, and on GPU its stream, scratch memory and TensorFlow's cuBLAS
// as the in-batch kernels' GpuGemm.
#ifndef FUSED_CONTRASTIVE_TF_DEVICE_H_
#define FUSED_CONTRASTIVE_TF_DEVICE_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "core/common/dtypes.h"
#include "core/common/parallel.h"
#include "core/in_batch/kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/registry.h"

namespace fused_contrastive {

// The devices an OpKernel class template is instantiated for.
struct CpuDevice {};
struct GpuDevice {};

// Op<CpuDevice> and, in builds with CUDA, Op<GpuDevice>, registered as `name`.
template <template <typename> class Op>
constexpr OpKernels DeviceKernels(const char* name) {
#if FC_WITH_CUDA
  return {{name, Create<Op<CpuDevice>>}, {name, Create<Op<GpuDevice>>}};
#else
  return {{name, Create<Op<CpuDevice>>}, {}};
#endif
}

// Runs call(parallel_for), a core kernel entry, on the op's intra-op pool:
// exhausted memory is ResourceExhausted, a dtype the entry lacks Internal.
absl::Status RunOnCpu(tensorflow::OpKernelContext* ctx,
                      const std::function<bool(const ParallelFor&)>& call);

#if FC_WITH_CUDA
// The op's CUDA stream, as the core kernels take it.
void* GpuStream(tensorflow::OpKernelContext* ctx);

// `bytes` of device scratch for one launch, held by *workspace.
absl::Status AllocateWorkspace(tensorflow::OpKernelContext* ctx, int64_t bytes,
                               tensorflow::Tensor* workspace);

absl::Status FromGpu(const GpuStatus& status);

// Runs launch(gemm) with a GpuGemm of `type` on the op's stream and TF's
// cuBLAS. A GEMM's own error (an absl::Status, which GpuStatus cannot carry)
// is reported in place of the launch's.
absl::Status WithTfGemm(tensorflow::OpKernelContext* ctx, DType type,
                        const std::function<GpuStatus(const GpuGemm&)>& launch);
#endif

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_DEVICE_H_
