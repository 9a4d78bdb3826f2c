// The functions that add each family's entry points to the module; module.cc calls them, so
// that a family's bindings stay in its own file.
#ifndef FUSED_CONTRASTIVE_PYBIND_REGISTRATIONS_H_
#define FUSED_CONTRASTIVE_PYBIND_REGISTRATIONS_H_

#include <pybind11/pybind11.h>

namespace fused_contrastive {
namespace bindings {

void RegisterDistances(pybind11::module_& m);
void RegisterPairs(pybind11::module_& m);
void RegisterInBatch(pybind11::module_& m);
// FFI_TARGETS and FFI_ATTRS, where the module carries the typed-FFI handlers.
void RegisterFfi(pybind11::module_& m);

}  // namespace bindings
}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_PYBIND_REGISTRATIONS_H_
