// The OpKernels' device adapters (device.h). The only OpKernel source that
// sees Eigen's devices and StreamExecutor.

// Eigen's ThreadPoolDevice (the op's intra-op pool) and GpuDevice (its CUDA
// stream) are only declared with these.
#define EIGEN_USE_THREADS
#if FC_WITH_CUDA
#define EIGEN_USE_GPU
#endif

#include "tf/device.h"

#include "absl/strings/str_cat.h"
#include "tf/kernels/common.h"
#include "unsupported/Eigen/CXX11/Tensor"
#if FC_WITH_CUDA
#include "xla/stream_executor/blas.h"
#include "xla/stream_executor/device_address.h"
#include "xla/stream_executor/engine_options.h"
#include "xla/stream_executor/stream.h"
#include "xla/stream_executor/stream_executor.h"
#endif

namespace fused_contrastive {

absl::Status RunOnCpu(tensorflow::OpKernelContext* ctx,
                      const std::function<bool(const ParallelFor&)>& call) {
  const Eigen::ThreadPoolDevice* device = &ctx->eigen_cpu_device();
  const ParallelFor pool = [device](int64_t size, const ElementCost& cost, const ShardFn& work) {
    device->parallelFor(
        size, Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored, cost.compute_cycles),
        [&work](Eigen::Index begin, Eigen::Index end) { work(begin, end); });
  };
  const KernelOutcome outcome = RunKernel(pool, call);
  if (outcome == KernelOutcome::kOutOfMemory) {
    return absl::ResourceExhaustedError(kKernelOutOfMemory);
  }
  return CheckDispatched(outcome == KernelOutcome::kDone);
}

#if FC_WITH_CUDA
void* GpuStream(tensorflow::OpKernelContext* ctx) { return ctx->eigen_gpu_device().stream(); }

absl::Status AllocateWorkspace(tensorflow::OpKernelContext* ctx, int64_t bytes,
                               tensorflow::Tensor* workspace) {
  return ctx->allocate_temp(tensorflow::DT_INT8, tensorflow::TensorShape({bytes}), workspace);
}

absl::Status FromGpu(const GpuStatus& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("contrastive loss: CUDA launch failed: ", status.error));
}

namespace {

namespace se = ::stream_executor;

// Row-major c = alpha·op(a)·op(b) + beta·c on TF's cuBLAS: cuBLAS is
// column-major, where the row-major c is cᵀ = op(b)ᵀ·op(a)ᵀ, so the operands
// (and their transpose flags and leading dimensions) are swapped.
template <typename T>
absl::Status RowMajorBlasGemm(se::blas::BlasSupport* blas, se::Stream* stream, bool trans_a,
                              bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                              const void* a, int64_t lda, const void* b, int64_t ldb, double beta,
                              void* c, int64_t ldc) {
  const auto op = [](bool t) {
    return t ? se::blas::Transpose::kTranspose : se::blas::Transpose::kNoTranspose;
  };
  const T alpha_t = static_cast<T>(alpha);
  const T beta_t = static_cast<T>(beta);
  // cuBLAS takes only the pointers; the sizes are not checked.
  const se::DeviceAddressBase a_memory(const_cast<void*>(a));
  const se::DeviceAddressBase b_memory(const_cast<void*>(b));
  se::DeviceAddressBase c_memory(c);
  // No TensorFloat-32, whatever TF's global setting: the Euclidean distances
  // come from ‖e_i‖² + ‖e_j‖² − 2·s_ij, whose cancellation test
  // (gram_distance_cancels) assumes s_ij rounded as float32, not to TF32's 10
  // bits. Deterministic algorithms: the kernel promises the same bits per run.
  const se::EngineOptions options(/*require_determinism=*/true, /*allow_tf32=*/false,
                                  /*require_command_buffer=*/false);
  return blas->DoBlasGemm(stream, op(trans_b), op(trans_a), static_cast<uint64_t>(n),
                          static_cast<uint64_t>(m), static_cast<uint64_t>(k),
                          se::blas::ToDataType<T>::value, &alpha_t, b_memory, static_cast<int>(ldb),
                          a_memory, static_cast<int>(lda), &beta_t, &c_memory,
                          static_cast<int>(ldc), options, se::blas::CallContext::kNone);
}

}  // namespace

absl::Status WithTfGemm(tensorflow::OpKernelContext* ctx, DType type,
                        const std::function<GpuStatus(const GpuGemm&)>& launch) {
  se::Stream* stream = ctx->op_device_context()->stream();
  se::blas::BlasSupport* blas = stream == nullptr ? nullptr : stream->parent()->AsBlas();
  if (blas == nullptr) {
    return absl::InternalError("in-batch contrastive loss: no cuBLAS for the op's stream");
  }
  absl::Status gemm_status;
  const GpuGemm gemm = [&](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                           double alpha, const void* a, int64_t lda, const void* b, int64_t ldb,
                           double beta, void* c, int64_t ldc) -> GpuStatus {
    const absl::Status status =
        type == DType::kFloat64 ? RowMajorBlasGemm<double>(blas, stream, trans_a, trans_b, m, n, k,
                                                           alpha, a, lda, b, ldb, beta, c, ldc)
                                : RowMajorBlasGemm<float>(blas, stream, trans_a, trans_b, m, n, k,
                                                          alpha, a, lda, b, ldb, beta, c, ldc);
    if (status.ok()) return GpuStatus{};
    gemm_status = status;
    return GpuStatus{"cuBLAS GEMM failed"};
  };
  const GpuStatus launched = launch(gemm);
  if (!gemm_status.ok()) {
    return absl::InternalError(
        absl::StrCat("in-batch contrastive loss: cuBLAS GEMM failed: ", gemm_status.message()));
  }
  return FromGpu(launched);
}
#endif

}  // namespace fused_contrastive
