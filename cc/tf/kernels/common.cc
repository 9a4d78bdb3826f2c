// What the OpKernels of every family share (kernels/common.h).
#include "tf/kernels/common.h"

#include "absl/strings/str_cat.h"

namespace fused_contrastive {

using ::tensorflow::Tensor;

absl::Status CheckDispatched(bool supported) {
  if (supported) return absl::OkStatus();
  return absl::InternalError("contrastive loss: a kernel was registered for a dtype it lacks");
}

absl::Status ReadScalar(const Tensor& t, const char* what, double* value) {
  if (t.NumElements() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "contrastive loss: ", what, " must be a scalar, got shape ", t.shape().DebugString()));
  }
  *value = t.flat<double>()(0);
  return absl::OkStatus();
}

}  // namespace fused_contrastive
