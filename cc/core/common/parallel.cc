#include "core/common/parallel.h"

namespace fused_contrastive {

void SerialFor(int64_t n, const ElementCost&, const ShardFn& work) {
  if (n > 0) work(0, n);
}

}  // namespace fused_contrastive
