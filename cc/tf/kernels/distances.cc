// The OpKernels of the loss on distances: they validate, allocate and run the
// core kernels (core/distances) on the op's device.
#include "tf/distances.h"
#include "core/distances/kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/device.h"
#include "tf/kernels/common.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// Labels, distances and margin at the positions of Io (either loss op),
// validated, plus the similar_label attr the kernel read at construction.
template <typename Io>
absl::Status ReadLossInputs(OpKernelContext* ctx, int similar_label, LossInputs* in) {
  const Tensor& labels = ctx->input(Io::kLabels);
  const Tensor& distances = ctx->input(Io::kDistances);
  TF_RETURN_IF_ERROR(CheckDistanceShapes(labels.shape(), distances.shape()));
  TF_RETURN_IF_ERROR(CheckDispatched(FromTf(labels.dtype(), &in->label_type) &&
                                     FromTf(distances.dtype(), &in->distance_type)));
  TF_RETURN_IF_ERROR(ReadScalar(ctx->input(Io::kMargin), "margin", &in->margin));
  TF_RETURN_IF_ERROR(CheckMargin(in->margin));
  in->labels = labels.data();
  in->distances = distances.data();
  in->n = distances.NumElements();
  in->similar_label = similar_label;
  return absl::OkStatus();
}

template <typename Device>
struct Launch;

template <>
struct Launch<CpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, const LossInputs& in, void* loss, void* grad) {
    return RunOnCpu(ctx,
                    [&](const ParallelFor& p) { return ContrastiveLossCpu(in, loss, grad, p); });
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    return RunOnCpu(ctx, [&](const ParallelFor& p) { return ContrastiveLossReducedCpu(args, p); });
  }

  // The scale is in host memory here: read it, and skip the pass when it is 1.
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    using Io = ScaleGradientIo;
    const Tensor& gradient = ctx->input(Io::kGradient);
    const Tensor& scale_tensor = ctx->input(Io::kScale);
    double scale = 0;
    TF_RETURN_IF_ERROR(CheckDispatched(VisitDistanceDType(type, [&](auto tag) {
      using D = typename decltype(tag)::type;
      scale = Convert<double>::from(*reinterpret_cast<const D*>(scale_tensor.data()));
    })));
    if (scale == 1) {
      ctx->set_output(Io::kScaled, gradient);
      return absl::OkStatus();
    }
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({Io::kGradient}, Io::kScaled,
                                                             gradient.shape(), &out));
    return RunOnCpu(ctx, [&](const ParallelFor& p) {
      return ScaleCpu(type, gradient.data(), scale, gradient.NumElements(), out->data(), p);
    });
  }
};

#if FC_WITH_CUDA
template <>
struct Launch<GpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, const LossInputs& in, void* loss, void* grad) {
    return FromGpu(ContrastiveLossGpu(in, loss, grad, GpuStream(ctx)));
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(
        AllocateWorkspace(ctx, ContrastiveLossReducedGpuWorkspace(args.in.n), &workspace));
    return FromGpu(ContrastiveLossReducedGpu(args, workspace.data(), GpuStream(ctx)));
  }

  // The scale stays on the device (reading it here would stall the stream).
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    using Io = ScaleGradientIo;
    const Tensor& gradient = ctx->input(Io::kGradient);
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({Io::kGradient}, Io::kScaled,
                                                             gradient.shape(), &out));
    return FromGpu(ScaleGpu(type, gradient.data(), ctx->input(Io::kScale).data(),
                            gradient.NumElements(), out->data(), GpuStream(ctx)));
  }
};
#endif

template <typename Device>
class ContrastiveLossOp : public OpKernel {
 public:
  explicit ContrastiveLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Io = ContrastiveLossIo;
    LossInputs in;
    OP_REQUIRES_OK(ctx, ReadLossInputs<Io>(ctx, similar_label_, &in));
    const tensorflow::TensorShape& shape = ctx->input(Io::kDistances).shape();
    // Reuse an input buffer for an output when nothing else holds it.
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({Io::kDistances}, Io::kLoss, shape, &loss));
    OP_REQUIRES_OK(ctx,
                   ctx->forward_input_or_allocate_output({Io::kLabels}, Io::kGrad, shape, &grad));
    OP_REQUIRES_OK(ctx, Launch<Device>::Loss(ctx, in, loss->data(), grad->data()));
  }

 private:
  int similar_label_;
};

template <typename Device>
class ContrastiveLossReducedOp : public OpKernel {
 public:
  explicit ContrastiveLossReducedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Io = ContrastiveLossReducedIo;
    ReducedLossArgs args;
    OP_REQUIRES_OK(ctx, ReadLossInputs<Io>(ctx, similar_label_, &args.in));
    const tensorflow::TensorShape& shape = ctx->input(Io::kDistances).shape();
    OP_REQUIRES_OK(ctx, CheckDistanceWeights(ctx->input(Io::kWeights).shape(), shape));
    OP_REQUIRES_OK(ctx, PrepareReduction<Io>(ctx, reduction_, &args.reduction));
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({Io::kDistances, Io::kWeights},
                                                              Io::kGrad, shape, &grad));
    args.grad = grad->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Reduced(ctx, args));
  }

 private:
  Reduction reduction_;
  int similar_label_;
};

template <typename Device>
class ScaleGradientOp : public OpKernel {
 public:
  explicit ScaleGradientOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    using Io = ScaleGradientIo;
    OP_REQUIRES(ctx, ctx->input(Io::kScale).NumElements() == 1,
                absl::InvalidArgumentError("ScaleGradient: scale must be a scalar"));
    // A branch on FromTf itself, not on a Status made from it: the compiler
    // then sees that `type` is set wherever it is read.
    DType type;
    OP_REQUIRES(ctx, FromTf(ctx->input(Io::kGradient).dtype(), &type), CheckDispatched(false));
    OP_REQUIRES_OK(ctx, Launch<Device>::Scale(ctx, type));
  }
};

}  // namespace

constexpr OpKernels kContrastiveLossKernels = DeviceKernels<ContrastiveLossOp>("ContrastiveLossOp");
constexpr OpKernels kContrastiveLossReducedKernels =
    DeviceKernels<ContrastiveLossReducedOp>("ContrastiveLossReducedOp");
constexpr OpKernels kScaleGradientKernels = DeviceKernels<ScaleGradientOp>("ScaleGradientOp");

}  // namespace fused_contrastive
