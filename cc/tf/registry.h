// The kernel classes each family's OpKernels and XLA lowerings hand to the
// registration table (registry.cc), which registers every op's kernels from
// one list.
#ifndef FUSED_CONTRASTIVE_TF_REGISTRY_H_
#define FUSED_CONTRASTIVE_TF_REGISTRY_H_

namespace tensorflow {
class OpKernel;
class OpKernelConstruction;
}  // namespace tensorflow

namespace fused_contrastive {

using KernelFactory = tensorflow::OpKernel* (*)(tensorflow::OpKernelConstruction*);

template <typename Kernel>
tensorflow::OpKernel* Create(tensorflow::OpKernelConstruction* ctx) {
  return new Kernel(ctx);
}

// A kernel class as TensorFlow's kernel registry lists it; none when create
// is null.
struct KernelClass {
  const char* name;
  KernelFactory create;
};

// An op's OpKernels; gpu is none in builds without CUDA.
struct OpKernels {
  KernelClass cpu;
  KernelClass gpu;
};

// An op's XLA lowerings: HLO on every backend but where host_call, a custom
// call of the CPU kernel, takes XLA's CPU backend (none: HLO there too).
struct XlaKernels {
  KernelClass hlo;
  KernelClass host_call;
};

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_TF_REGISTRY_H_
