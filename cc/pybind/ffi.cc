// The typed-FFI handlers (ffi/targets.h) for JAX's front end
// (fused_contrastive/jax.py): each target's handler as a PyCapsule, which
// jax.ffi.register_ffi_target takes, and the int32 value of each name the
// handlers' attrs take, read off the enums (no second list in Python).
#include <pybind11/pybind11.h>

#include <cstddef>

#include "core/common/distance.h"
#include "core/common/reduction.h"
#include "core/in_batch/math.h"
#include "ffi/targets.h"
#include "pybind/registrations.h"

namespace fused_contrastive {
namespace bindings {
namespace {

namespace py = pybind11;

template <typename E, size_t N>
py::dict AttrValues(const E (&all)[N], const char* (*name_of)(E)) {
  py::dict values;
  for (E e : all) values[py::str(name_of(e))] = static_cast<int>(e);
  return values;
}

}  // namespace

void RegisterFfi(py::module_& m) {
  py::dict targets;
  for (const FfiTarget& target : kHostTargets) {
    targets[py::str(target.name)] = py::capsule(reinterpret_cast<void*>(target.handler));
  }
  m.attr("FFI_TARGETS") = targets;
  // JAX's targets on CUDA (ffi/gpu.cc), where the module has the CUDA kernels.
  py::dict cuda_targets;
#if FC_WITH_CUDA
  const FfiTarget on_cuda[] = {
      {kLossTarget, FusedContrastiveLossCuda},
      {kEmbeddingJaxTarget, FusedContrastiveEmbeddingLossJaxCuda},
      {kEmbeddingGradTarget, FusedContrastiveEmbeddingLossGradCuda},
      {kEmbeddingPairJaxTarget, FusedContrastiveEmbeddingPairLossJaxCuda},
      {kEmbeddingPairGradTarget, FusedContrastiveEmbeddingPairLossGradCuda},
      {kInBatchJaxTarget, FusedContrastiveInBatchLossJaxCuda},
      {kInBatchGradJaxTarget, FusedContrastiveInBatchLossGradJaxCuda},
  };
  for (const FfiTarget& target : on_cuda) {
    cuda_targets[py::str(target.name)] = py::capsule(reinterpret_cast<void*>(target.handler));
  }
#endif
  m.attr("FFI_CUDA_TARGETS") = cuda_targets;
  py::dict reductions;
  for (const char* name : {"sum", "mean", "weighted_mean"}) {
    Reduction reduction;
    if (ParseReduction(name, &reduction)) reductions[py::str(name)] = static_cast<int>(reduction);
  }
  py::dict attrs;
  attrs["distance"] = AttrValues(kAllDistances, DistanceName);
  attrs["pair_weighting"] = AttrValues(kAllPairWeightings, PairWeightingName);
  attrs["miner"] = AttrValues(kAllMiners, MinerName);
  attrs["reduction"] = reductions;
  m.attr("FFI_ATTRS") = attrs;
}

}  // namespace bindings
}  // namespace fused_contrastive
