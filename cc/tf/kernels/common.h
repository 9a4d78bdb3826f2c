// What the OpKernels of every family share: the dispatch check, scalar
// inputs, and the Keras reduction's inputs and outputs.
#ifndef FUSED_CONTRASTIVE_TF_KERNELS_COMMON_H_
#define FUSED_CONTRASTIVE_TF_KERNELS_COMMON_H_

#include "absl/status/status.h"
#include "core/common/reduction.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace fused_contrastive {

// The kernels are registered for exactly the dtypes the core kernels support
// (registry.cc), so a dtype the dispatch cannot place is a build defect.
absl::Status CheckDispatched(bool supported);

// A float64 scalar input.
absl::Status ReadScalar(const tensorflow::Tensor& t, const char* what, double* value);

// A reduced op's ReductionArgs: its sample_weight (whose shape the caller
// checked) and loss_scale inputs, and its loss and reduction_scale outputs,
// allocated; Io: the op's positions.
template <typename Io>
absl::Status PrepareReduction(tensorflow::OpKernelContext* ctx, Reduction kind,
                              ReductionArgs* out) {
  const tensorflow::Tensor& weights = ctx->input(Io::kWeights);
  out->weights = weights.data();
  out->scalar_weight = weights.dims() == 0;
  out->kind = kind;
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(Io::kLossScale), "loss_scale", &out->loss_scale));
  tensorflow::Tensor* loss = nullptr;
  tensorflow::Tensor* reduction_scale = nullptr;
  TF_RETURN_IF_ERROR(ctx->allocate_output(Io::kLoss, tensorflow::TensorShape({}), &loss));
  TF_RETURN_IF_ERROR(
      ctx->allocate_output(Io::kReductionScale, tensorflow::TensorShape({}), &reduction_scale));
  out->loss = loss->data();
  out->reduction_scale = reduction_scale->flat<double>().data();
  return absl::OkStatus();
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_KERNELS_COMMON_H_
