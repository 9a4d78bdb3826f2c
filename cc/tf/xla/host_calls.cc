// Registers every handler of ffi/targets.h with the XLA inside TensorFlow, for
// the Host (CPU) platform, when the op library loads.
#include "ffi/targets.h"
#include "xla/ffi/api/ffi.h"

namespace fused_contrastive {
namespace {

[[maybe_unused]] const bool registered = [] {
  for (const FfiTarget& target : kHostTargets) {
    ::xla::ffi::Ffi::RegisterStaticHandler(XLA_FFI_GetApi(), target.name, "Host", target.handler);
  }
  return true;
}();

}  // namespace
}  // namespace fused_contrastive
