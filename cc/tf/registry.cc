// The registration table: one row per op, the only list of the library's ops,
// from which TensorFlow gets every kernel: the OpKernels on CPU and GPU, the
// XLA lowerings, and, when the library loads after XLA has made its JIT
// kernels, those kernels themselves.
#include "tf/registry.h"

#include <array>
#include <initializer_list>
#include <string>

#include "core/common/dtypes.h"
#include "core/in_batch/kernels.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/distances.h"
#include "tf/in_batch.h"
#include "tf/names.h"
#include "tf/pairs.h"

namespace fused_contrastive {
namespace {

// Names of inputs in host memory; unused slots are null.
using HostInputs = std::array<const char*, 4>;

// Whether an op has a Tlabels attr.
enum LabelAttr : bool { kNoTlabels = false, kTlabels = true };

struct OpRegistration {
  const char* op;
  LabelAttr labels;
  bool (*value_types)(DType);  // the T attr's dtypes
  HostInputs host_memory;      // on every device
  HostInputs cpu_host_memory;  // on CPU only (its kernel reads them there)
  const OpKernels* kernels;
  const XlaKernels* xla;
};

// Per op: name, Tlabels attr, T's dtypes, inputs in host memory (on every
// device; on CPU only), OpKernels, XLA lowerings. Margins and loss scales are
// float64 scalars, anchor ranges int64 pairs, that the kernels read on the host.
// clang-format off: one op per row reads as a table.
constexpr OpRegistration kOps[] = {
    {kOpName, kTlabels, IsDistanceDType, {"margin"}, {},
     &kContrastiveLossKernels, &kContrastiveLossXla},
    {kReducedOpName, kTlabels, IsDistanceDType, {"margin", "loss_scale"}, {},
     &kContrastiveLossReducedKernels, &kContrastiveLossReducedXla},
    // The GPU kernel reads the scale on the device: reading it on the host
    // would stall the stream.
    {kScaleOpName, kNoTlabels, IsDistanceDType, {}, {"scale"},
     &kScaleGradientKernels, &kScaleGradientXla},
    {kEmbeddingOpName, kTlabels, IsDistanceDType, {"margin"}, {},
     &kEmbeddingLossKernels, &kEmbeddingLossXla},
    {kEmbeddingGradOpName, kNoTlabels, IsDistanceDType, {}, {},
     &kEmbeddingGradKernels, &kEmbeddingGradXla},
    {kEmbeddingReducedOpName, kTlabels, IsDistanceDType, {"margin", "loss_scale"}, {},
     &kEmbeddingReducedKernels, &kEmbeddingReducedXla},
    {kEmbeddingPairReducedOpName, kTlabels, IsDistanceDType, {"margin", "loss_scale"}, {},
     &kEmbeddingPairReducedKernels, &kEmbeddingPairReducedXla},
    {kInBatchOpName, kNoTlabels, IsInBatchDType, {"anchors", "margin", "positive_margin"}, {},
     &kInBatchLossKernels, &kInBatchLossXla},
    {kInBatchGradOpName, kNoTlabels, IsInBatchDType, {"anchors", "margin", "positive_margin"}, {},
     &kInBatchGradKernels, &kInBatchGradXla},
    {kInBatchReducedOpName, kNoTlabels, IsInBatchDType,
     {"anchors", "margin", "positive_margin", "loss_scale"}, {},
     &kInBatchReducedKernels, &kInBatchReducedXla},
};
// clang-format on

// Registers `kernel` for `op` on `device_type` (CPU, GPU or an XLA JIT device),
// one KernelDef per supported value dtype, times every label dtype when the
// op has typed labels, with the inputs of `host_memory` in host memory.
// Registering each pair explicitly keeps TensorFlow's kernel registry an
// honest list of what runs where.
void RegisterKernels(const OpRegistration& op, const char* device_type, const KernelClass& kernel,
                     std::initializer_list<HostInputs> host_memory) {
  for (DType value : kAllDTypes) {
    if (!op.value_types(value)) continue;
    for (DType label : kAllDTypes) {
      tensorflow::KernelDefBuilder builder(op.op);
      builder.Device(device_type).TypeConstraint("T", ToTf(value));
      if (op.labels == kTlabels) builder.TypeConstraint("Tlabels", ToTf(label));
      for (const HostInputs& inputs : host_memory) {
        for (const char* input : inputs) {
          if (input != nullptr) builder.HostMemory(input);
        }
      }
      // The registrar copies what it keeps; it need not outlive this call.
      tensorflow::kernel_factory::OpKernelRegistrar(builder.Build(), kernel.name, kernel.create);
      if (op.labels == kNoTlabels) break;
    }
  }
}

// The lowering XLA picks for `op` on a JIT device: a registration for one
// device (the host call's, on XLA's CPU backend) takes precedence over the
// one for all.
const KernelClass& JitKernel(const OpRegistration& op, const std::string& backend) {
  const bool host_call =
      backend == tensorflow::DEVICE_CPU_XLA_JIT && op.xla->host_call.create != nullptr;
  return host_call ? op.xla->host_call : op.xla->hlo;
}

// TensorFlow turns XLA registrations into kernels for its JIT devices once, at
// the first XLA compilation in the process, and ignores later ones.
bool JitKernelsRegistered(const std::string& backend) {
  tensorflow::NodeDef probe;
  probe.set_op("Identity");
  (*probe.mutable_attr())["T"].set_type(tensorflow::DT_FLOAT);
  return tensorflow::KernelDefAvailable(tensorflow::DeviceType(backend), probe);
}

const bool kRegistered = [] {
  for (const OpRegistration& op : kOps) {
    RegisterKernels(op, tensorflow::DEVICE_CPU, op.kernels->cpu,
                    {op.host_memory, op.cpu_host_memory});
    if (op.kernels->gpu.create != nullptr) {
      RegisterKernels(op, tensorflow::DEVICE_GPU, op.kernels->gpu, {op.host_memory});
    }
    tensorflow::XlaOpRegistrar(
        tensorflow::XlaOpRegistrationBuilder::Name(op.op).Build(op.xla->hlo.create));
    if (op.xla->host_call.create != nullptr) {
      tensorflow::XlaOpRegistrar(tensorflow::XlaOpRegistrationBuilder::Name(op.op)
                                     .Device(tensorflow::DEVICE_CPU_XLA_JIT)
                                     .Build(op.xla->host_call.create));
    }
  }
  // When this library is loaded after that first compilation (an XLA
  // function ran before `import fused_contrastive`), register our JIT kernels
  // directly, as that step would have.
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (!JitKernelsRegistered(backend)) continue;
    for (const OpRegistration& op : kOps) {
      RegisterKernels(op, backend.c_str(), JitKernel(op, backend), {});
    }
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
