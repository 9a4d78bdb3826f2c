// TensorFlow glue: the op definitions, and OpKernels that only validate,
// allocate and dispatch to the raw-pointer kernels.
//
//   ContrastiveLoss         per-sample loss and d(loss)/d(distance)
//   ContrastiveLossReduced  the Keras reductions fused in: reduced loss and the
//                           per-sample gradient with weight and divisor applied
//   ScaleGradient           backward of the reduced op: gradient * upstream
//                           scalar, a no-op when the upstream gradient is 1

// Eigen's ThreadPoolDevice (the op's intra-op pool) and GpuDevice (its CUDA
// stream) are only declared with these.
#define EIGEN_USE_THREADS
#if FC_WITH_CUDA
#define EIGEN_USE_GPU
#endif

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "contrastive_kernels.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf_shared.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace fused_contrastive {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

absl::Status UnsupportedPair(DataType labels, DataType distances) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss: unsupported dtypes labels=", tensorflow::DataTypeString(labels),
      " distances=", tensorflow::DataTypeString(distances)));
}

absl::Status ReadScalar(const Tensor& t, const char* what, double* value) {
  if (t.NumElements() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("contrastive loss: ", what,
                                                   " must be a scalar, got shape ",
                                                   t.shape().DebugString()));
  }
  *value = t.flat<double>()(0);
  return absl::OkStatus();
}

// margin is a float64 scalar input rather than a float attr: TensorFlow's float
// attrs are 32-bit (margins such as 0.1 would be rounded before float64 math)
// and eager execution cannot pass tensor-valued attrs. As an input it can also
// be a variable (a margin schedule). It lives in host memory on every device.
absl::Status ReadMargin(const Tensor& t, double* margin) {
  TF_RETURN_IF_ERROR(ReadScalar(t, "margin", margin));
  return CheckMargin(*margin);
}

// Labels and distances, merged; shared by both loss ops' shape functions.
absl::Status MergeLabelsAndDistances(InferenceContext* c, ShapeHandle* merged) {
  if (!c->Merge(c->input(0), c->input(1), merged).ok()) {
    return ShapeMismatch("distances", c->DebugString(c->input(0)), c->DebugString(c->input(1)));
  }
  return absl::OkStatus();
}

absl::Status RequireScalar(InferenceContext* c, int input) {
  ShapeHandle unused;
  return c->WithRank(c->input(input), 0, &unused);
}

// The dtypes of labels and distances, validated against each other and mapped.
absl::Status CheckInputs(OpKernelContext* ctx, DType* label_type, DType* distance_type) {
  const Tensor& labels = ctx->input(0);
  const Tensor& distances = ctx->input(1);
  if (labels.shape() != distances.shape()) {
    return ShapeMismatch("distances", labels.shape().DebugString(),
                         distances.shape().DebugString());
  }
  if (!FromTf(labels.dtype(), label_type) || !FromTf(distances.dtype(), distance_type)) {
    return UnsupportedPair(labels.dtype(), distances.dtype());
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP(kOpName)
    .Input("labels: Tlabels")
    .Input("distances: T")
    .Input("margin: double")
    .Output("loss: T")
    .Output("dloss_ddistances: T")
    .Attr("Tlabels: {bool, int32, int64, half, bfloat16, float, double}")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances(c, &merged));
      TF_RETURN_IF_ERROR(RequireScalar(c, 2));
      c->set_output(0, merged);
      c->set_output(1, merged);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Contrastive loss y*d^2 + (1-y)*max(margin-d, 0)^2 per element, and its
derivative with respect to the distances d, from one pass over the inputs.
Labels are used linearly (soft labels in [0, 1] work) and get no gradient.
)doc");

REGISTER_OP(kReducedOpName)
    .Input("labels: Tlabels")
    .Input("distances: T")
    .Input("sample_weight: T")
    .Input("margin: double")
    .Input("loss_scale: double")
    .Output("loss: T")
    .Output("dloss_ddistances: T")
    .Output("gradient_scale: double")
    .Attr("Tlabels: {bool, int32, int64, half, bfloat16, float, double}")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("reduction: {'sum', 'mean', 'weighted_mean'}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(MergeLabelsAndDistances(c, &merged));
      ShapeHandle weights = c->input(2);
      if (c->RankKnown(weights) && c->Rank(weights) != 0) {
        ShapeHandle unused;
        if (!c->Merge(merged, weights, &unused).ok()) {
          return ShapeMismatch("sample_weight", c->DebugString(merged), c->DebugString(weights));
        }
      }
      TF_RETURN_IF_ERROR(RequireScalar(c, 3));
      TF_RETURN_IF_ERROR(RequireScalar(c, 4));
      c->set_output(0, c->Scalar());
      c->set_output(1, merged);
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
The contrastive loss reduced as Keras does: sum(w * loss) / divisor * loss_scale
with divisor 1 ('sum'), the element count ('mean') or the sum of the weights
('weighted_mean'; the weight itself when sample_weight is a scalar), 0 when the
divisor is 0. dloss_ddistances is d(that)/d(distances) and gradient_scale is
loss_scale / divisor. sample_weight is a scalar or has the shape of distances.
)doc");

REGISTER_OP(kScaleOpName)
    .Input("gradient: T")
    .Input("scale: T")
    .Output("scaled: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(RequireScalar(c, 1));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("gradient * scale for a scalar scale; passes gradient through when scale is 1.");

// Per-device launches of the three kernels.
template <typename Device>
struct Launch;

template <>
struct Launch<Eigen::ThreadPoolDevice> {
  static ParallelFor Pool(OpKernelContext* ctx) {
    const Eigen::ThreadPoolDevice* device = &ctx->eigen_cpu_device();
    return [device](int64_t size, const ElementCost& cost, const ShardFn& work) {
      device->parallelFor(size,
                          Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored,
                                              cost.compute_cycles),
                          [&work](Eigen::Index begin, Eigen::Index end) { work(begin, end); });
    };
  }

  static absl::Status Loss(OpKernelContext* ctx, DType label_type, DType distance_type,
                           const void* labels, const void* distances, int64_t n, double margin,
                           void* loss, void* grad) {
    if (!ContrastiveLossCpu(label_type, distance_type, labels, distances, n, margin, loss, grad,
                            Pool(ctx))) {
      return UnsupportedPair(ToTf(label_type), ToTf(distance_type));
    }
    return absl::OkStatus();
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    if (!ContrastiveLossReducedCpu(args, Pool(ctx))) {
      return UnsupportedPair(ToTf(args.label_type), ToTf(args.distance_type));
    }
    return absl::OkStatus();
  }

  // The scale is in host memory here: read it, and skip the pass when it is 1.
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    const Tensor& gradient = ctx->input(0);
    const Tensor& scale_tensor = ctx->input(1);
    double scale;
    if (!VisitDistanceDType(type, [&](auto tag) {
          using D = typename decltype(tag)::type;
          scale = Convert<double>::from(*reinterpret_cast<const D*>(scale_tensor.data()));
        })) {
      return absl::InvalidArgumentError("ScaleGradient: unsupported dtype");
    }
    if (scale == 1) {
      ctx->set_output(0, gradient);
      return absl::OkStatus();
    }
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({0}, 0, gradient.shape(), &out));
    ScaleCpu(type, gradient.data(), scale, gradient.NumElements(), out->data(), Pool(ctx));
    return absl::OkStatus();
  }
};

#if FC_WITH_CUDA
absl::Status FromGpu(const GpuStatus& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("contrastive loss: CUDA launch failed: ", status.error));
}

template <>
struct Launch<Eigen::GpuDevice> {
  static absl::Status Loss(OpKernelContext* ctx, DType label_type, DType distance_type,
                           const void* labels, const void* distances, int64_t n, double margin,
                           void* loss, void* grad) {
    return FromGpu(ContrastiveLossGpu(label_type, distance_type, labels, distances, n, margin,
                                      loss, grad, ctx->eigen_gpu_device().stream()));
  }

  static absl::Status Reduced(OpKernelContext* ctx, const ReducedLossArgs& args) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8, tensorflow::TensorShape({ContrastiveLossReducedGpuWorkspace(args.n)}),
        &workspace));
    return FromGpu(ContrastiveLossReducedGpu(args, workspace.data(),
                                             ctx->eigen_gpu_device().stream()));
  }

  // The scale stays on the device (reading it here would stall the stream).
  static absl::Status Scale(OpKernelContext* ctx, DType type) {
    const Tensor& gradient = ctx->input(0);
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({0}, 0, gradient.shape(), &out));
    return FromGpu(ScaleGpu(type, gradient.data(), ctx->input(1).data(), gradient.NumElements(),
                            out->data(), ctx->eigen_gpu_device().stream()));
  }
};
#endif

template <typename Device>
class ContrastiveLossOp : public OpKernel {
 public:
  explicit ContrastiveLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    DType label_type = DType::kFloat32, distance_type = DType::kFloat32;
    OP_REQUIRES_OK(ctx, CheckInputs(ctx, &label_type, &distance_type));
    double margin = 0;
    OP_REQUIRES_OK(ctx, ReadMargin(ctx->input(2), &margin));
    const Tensor& distances = ctx->input(1);
    // Reuse an input buffer for an output when nothing else holds it.
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, distances.shape(), &loss));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 1, distances.shape(), &grad));
    OP_REQUIRES_OK(ctx, Launch<Device>::Loss(ctx, label_type, distance_type, ctx->input(0).data(),
                                             distances.data(), distances.NumElements(), margin,
                                             loss->data(), grad->data()));
  }
};

template <typename Device>
class ContrastiveLossReducedOp : public OpKernel {
 public:
  explicit ContrastiveLossReducedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compute(OpKernelContext* ctx) override {
    ReducedLossArgs args;
    OP_REQUIRES_OK(ctx, CheckInputs(ctx, &args.label_type, &args.distance_type));
    const Tensor& distances = ctx->input(1);
    const Tensor& weights = ctx->input(2);
    args.scalar_weight = weights.dims() == 0;
    OP_REQUIRES(ctx, args.scalar_weight || weights.shape() == distances.shape(),
                ShapeMismatch("sample_weight", ctx->input(0).shape().DebugString(),
                              weights.shape().DebugString()));
    OP_REQUIRES_OK(ctx, ReadMargin(ctx->input(3), &args.margin));
    OP_REQUIRES_OK(ctx, ReadScalar(ctx->input(4), "loss_scale", &args.loss_scale));
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    Tensor* gradient_scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}), &loss));
    OP_REQUIRES_OK(ctx,
                   ctx->forward_input_or_allocate_output({1, 2}, 1, distances.shape(), &grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tensorflow::TensorShape({}), &gradient_scale));
    args.labels = ctx->input(0).data();
    args.distances = distances.data();
    args.weights = weights.data();
    args.n = distances.NumElements();
    args.reduction = reduction_;
    args.loss = loss->data();
    args.grad = grad->data();
    args.gradient_scale = gradient_scale->data();
    OP_REQUIRES_OK(ctx, Launch<Device>::Reduced(ctx, args));
  }

 private:
  Reduction reduction_;
};

template <typename Device>
class ScaleGradientOp : public OpKernel {
 public:
  explicit ScaleGradientOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == 1,
                absl::InvalidArgumentError("ScaleGradient: scale must be a scalar"));
    DType type;
    OP_REQUIRES(ctx, FromTf(ctx->input(0).dtype(), &type),
                absl::InvalidArgumentError("ScaleGradient: unsupported dtype"));
    OP_REQUIRES_OK(ctx, Launch<Device>::Scale(ctx, type));
  }
};

template <typename Op>
OpKernel* Create(OpKernelConstruction* ctx) {
  return new Op(ctx);
}

// One kernel class serves every dtype (pair); registering each explicitly
// keeps TensorFlow's kernel registry an honest list of what runs where.
void Register(const char* op, const char* device_type, const std::vector<DataType>& labels,
              const std::vector<const char*>& host_memory,
              OpKernel* (*create)(OpKernelConstruction*), const char* class_name) {
  for (DType distance : kAllDTypes) {
    if (!IsDistanceDType(distance)) continue;
    for (DataType label : labels) {
      tensorflow::KernelDefBuilder builder(op);
      builder.Device(device_type).TypeConstraint("T", ToTf(distance));
      if (label != tensorflow::DT_INVALID) builder.TypeConstraint("Tlabels", label);
      for (const char* arg : host_memory) builder.HostMemory(arg);
      // The registrar copies what it keeps; it need not outlive this call.
      tensorflow::kernel_factory::OpKernelRegistrar(builder.Build(), class_name, create);
    }
  }
}

template <typename Device>
void RegisterKernels(const char* device_type, bool scale_in_host_memory) {
  std::vector<DataType> labels;
  for (DType t : kAllDTypes) labels.push_back(ToTf(t));
  Register(kOpName, device_type, labels, {"margin"}, Create<ContrastiveLossOp<Device>>,
           "ContrastiveLossOp");
  Register(kReducedOpName, device_type, labels, {"margin", "loss_scale"},
           Create<ContrastiveLossReducedOp<Device>>, "ContrastiveLossReducedOp");
  std::vector<const char*> scale_host;
  if (scale_in_host_memory) scale_host.push_back("scale");
  Register(kScaleOpName, device_type, {tensorflow::DT_INVALID}, scale_host,
           Create<ScaleGradientOp<Device>>, "ScaleGradientOp");
}

static const bool kKernelsRegistered = [] {
  RegisterKernels<Eigen::ThreadPoolDevice>(tensorflow::DEVICE_CPU, true);
#if FC_WITH_CUDA
  RegisterKernels<Eigen::GpuDevice>(tensorflow::DEVICE_GPU, false);
#endif
  return true;
}();

}  // namespace fused_contrastive
