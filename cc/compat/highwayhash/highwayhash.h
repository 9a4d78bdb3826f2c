// Compile-only stand-in for the highwayhash headers that xla/printer.h
// includes but the TensorFlow wheel does not ship. xla/printer.h names
// HighwayHashCatT only as a member of HighwayHashPrinter, a class the XLA
// lowering never constructs, so an empty type is enough to parse it. Only
// the sources that include XLA's headers (cc/tf/xla, cc/tf/registry.cc) see
// this directory.
#ifndef FUSED_CONTRASTIVE_COMPAT_HIGHWAYHASH_H_
#define FUSED_CONTRASTIVE_COMPAT_HIGHWAYHASH_H_

#include <cstdint>

#define HH_TARGET_PREFERRED 0u

namespace highwayhash {
template <uint32_t Target>
class HighwayHashCatT {};
}  // namespace highwayhash

#endif  // FUSED_CONTRASTIVE_COMPAT_HIGHWAYHASH_H_
