// TensorFlow glue: the op definition, and an OpKernel that only validates,
// allocates and dispatches to the raw-pointer kernels.

// Eigen's ThreadPoolDevice (the op's intra-op pool) and GpuDevice (its CUDA
// stream) are only declared with these.
#define EIGEN_USE_THREADS
#if FC_WITH_CUDA
#define EIGEN_USE_GPU
#endif

#include "absl/strings/str_cat.h"
#include "contrastive_kernels.h"
#include "tf_dtypes.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace fused_contrastive {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

absl::Status ShapeMismatch(const std::string& labels, const std::string& distances) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss: labels and distances must have the same shape, got labels ", labels,
      " and distances ", distances));
}

// margin is a float64 scalar input rather than a float attr: TensorFlow's float
// attrs are 32-bit (margins such as 0.1 would be rounded before float64 math)
// and eager execution cannot pass tensor-valued attrs. As an input it can also
// be a variable (a margin schedule). It lives in host memory on every device.
absl::Status ReadMargin(const Tensor& t, double* margin) {
  if (t.NumElements() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "contrastive loss: margin must be a scalar, got shape ", t.shape().DebugString()));
  }
  *margin = t.flat<double>()(0);
  if (!IsValidMargin(*margin)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "contrastive loss: margin must be finite and non-negative, got ", *margin));
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
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle merged;
      if (!c->Merge(c->input(0), c->input(1), &merged).ok()) {
        return ShapeMismatch(c->DebugString(c->input(0)), c->DebugString(c->input(1)));
      }
      tensorflow::shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
      c->set_output(0, merged);
      c->set_output(1, merged);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Contrastive loss y*d^2 + (1-y)*max(margin-d, 0)^2 per element, and its
derivative with respect to the distances d, from one pass over the inputs.
Labels are used linearly (soft labels in [0, 1] work) and get no gradient.
)doc");

absl::Status UnsupportedPair(DataType labels, DataType distances) {
  return absl::InvalidArgumentError(absl::StrCat(
      "contrastive loss: unsupported dtypes labels=", tensorflow::DataTypeString(labels),
      " distances=", tensorflow::DataTypeString(distances)));
}

template <typename Device>
struct LaunchContrastiveLoss;

template <>
struct LaunchContrastiveLoss<Eigen::ThreadPoolDevice> {
  static absl::Status Run(OpKernelContext* ctx, DType label_type, DType distance_type,
                          const void* labels, const void* distances, int64_t n, double margin,
                          void* loss, void* grad) {
    const Eigen::ThreadPoolDevice& device = ctx->eigen_cpu_device();
    const ParallelFor pool = [&device](int64_t size, const ElementCost& cost, const ShardFn& work) {
      device.parallelFor(size,
                         Eigen::TensorOpCost(cost.bytes_loaded, cost.bytes_stored,
                                             cost.compute_cycles),
                         [&work](Eigen::Index begin, Eigen::Index end) { work(begin, end); });
    };
    if (!ContrastiveLossCpu(label_type, distance_type, labels, distances, n, margin, loss, grad,
                            pool)) {
      return UnsupportedPair(ToTf(label_type), ToTf(distance_type));
    }
    return absl::OkStatus();
  }
};

#if FC_WITH_CUDA
template <>
struct LaunchContrastiveLoss<Eigen::GpuDevice> {
  static absl::Status Run(OpKernelContext* ctx, DType label_type, DType distance_type,
                          const void* labels, const void* distances, int64_t n, double margin,
                          void* loss, void* grad) {
    const GpuStatus status =
        ContrastiveLossGpu(label_type, distance_type, labels, distances, n, margin, loss, grad,
                           ctx->eigen_gpu_device().stream());
    if (!status.ok()) {
      return absl::InternalError(
          absl::StrCat("contrastive loss: CUDA kernel launch failed: ", status.error));
    }
    return absl::OkStatus();
  }
};
#endif

template <typename Device>
class ContrastiveLossOp : public OpKernel {
 public:
  explicit ContrastiveLossOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& labels = ctx->input(0);
    const Tensor& distances = ctx->input(1);
    OP_REQUIRES(ctx, labels.shape() == distances.shape(),
                ShapeMismatch(labels.shape().DebugString(), distances.shape().DebugString()));
    double margin;
    OP_REQUIRES_OK(ctx, ReadMargin(ctx->input(2), &margin));
    DType label_type, distance_type;
    OP_REQUIRES(ctx, FromTf(labels.dtype(), &label_type) && FromTf(distances.dtype(), &distance_type),
                UnsupportedPair(labels.dtype(), distances.dtype()));

    // Reuse an input buffer for an output when nothing else holds it.
    Tensor* loss = nullptr;
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, distances.shape(), &loss));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 1, distances.shape(), &grad));

    OP_REQUIRES_OK(ctx, LaunchContrastiveLoss<Device>::Run(
                            ctx, label_type, distance_type, labels.data(), distances.data(),
                            distances.NumElements(), margin, loss->data(), grad->data()));
  }
};

// One kernel class serves every dtype pair; registering each pair explicitly
// keeps TensorFlow's kernel registry an honest list of what runs where.
template <typename Device>
void RegisterKernels(const char* device_type) {
  for (DType label : kAllDTypes) {
    for (DType distance : kAllDTypes) {
      if (!IsDistanceDType(distance)) continue;
      const tensorflow::KernelDef* def = tensorflow::KernelDefBuilder(kOpName)
                                             .Device(device_type)
                                             .TypeConstraint("Tlabels", ToTf(label))
                                             .TypeConstraint("T", ToTf(distance))
                                             .HostMemory("margin")
                                             .Build();
      // The registrar keeps only what it copies out; it need not outlive this.
      tensorflow::kernel_factory::OpKernelRegistrar(
          def, "ContrastiveLossOp",
          [](OpKernelConstruction* ctx) -> OpKernel* { return new ContrastiveLossOp<Device>(ctx); });
    }
  }
}

static const bool kKernelsRegistered = [] {
  RegisterKernels<Eigen::ThreadPoolDevice>(tensorflow::DEVICE_CPU);
#if FC_WITH_CUDA
  RegisterKernels<Eigen::GpuDevice>(tensorflow::DEVICE_GPU);
#endif
  return true;
}();

}  // namespace fused_contrastive
