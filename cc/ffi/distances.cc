// The loss on distances' typed-FFI handler (ffi/targets.h), for JAX's front
// end: ContrastiveLossCpu, the kernel of the TF op, so that JAX gets its bits.
// TensorFlow's XLA needs no handler here: it lowers this loss to HLO that it
// fuses with its neighbours (tf/xla/distances.cc). Operands: labels and
// distances of one shape; results: the loss and d(loss)/d(distance) of the
// distances' shape and dtype. The margin is an attr, a float64 that JAX
// passes exactly without jax_enable_x64.
#include <cstdint>

#include "core/distances/kernels.h"
#include "ffi/args.h"
#include "ffi/host.h"
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {

ffi::Error ReadLossInputs(ffi::AnyBuffer labels, ffi::AnyBuffer distances, double margin,
                          int32_t similar_label, LossInputs* in) {
  if (labels.element_count() != distances.element_count() || !IsValidMargin(margin) ||
      !FromFfi(labels.element_type(), &in->label_type) ||
      !FromFfi(distances.element_type(), &in->distance_type)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "contrastive loss: labels and distances must have as many values and "
                      "supported dtypes, and the margin must be finite and non-negative");
  }
  in->labels = labels.untyped_data();
  in->distances = distances.untyped_data();
  in->n = distances.element_count();
  in->margin = margin;
  in->similar_label = similar_label;
  return ffi::Error::Success();
}

namespace {

ffi::Error LossHost(ffi::ThreadPool pool, ffi::AnyBuffer labels, ffi::AnyBuffer distances,
                    ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad,
                    double margin, int32_t similar_label) {
  LossInputs in;
  ffi::Error error = ReadLossInputs(labels, distances, margin, similar_label, &in);
  if (!error.success()) return error;
  return RunHostKernel(pool, true, [&](const ParallelFor& p) {
    return ContrastiveLossCpu(in, loss->untyped_data(), grad->untyped_data(), p);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedContrastiveLoss, LossHost,
                              LossBinding(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

}  // namespace fused_contrastive
