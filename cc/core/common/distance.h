// The distances between two embeddings that the families are defined for,
// their names, and the dispatch that instantiates a kernel per distance.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_DISTANCE_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_DISTANCE_H_

#include <string>

namespace fused_contrastive {

enum class Distance : int { kEuclidean, kCosine, kManhattan };

constexpr Distance kAllDistances[] = {Distance::kEuclidean, Distance::kCosine,
                                      Distance::kManhattan};

// The names of the `distance` attr and argument.
inline const char* DistanceName(Distance k) {
  switch (k) {
    case Distance::kEuclidean: return "euclidean";
    case Distance::kCosine: return "cosine";
    case Distance::kManhattan: return "manhattan";
  }
  return "unknown";
}

inline bool ParseDistance(const std::string& name, Distance* out) {
  for (Distance k : kAllDistances) {
    if (name == DistanceName(k)) {
      *out = k;
      return true;
    }
  }
  return false;
}

// Calls f(DistanceTag<k>{}): kernels are instantiated per distance so that
// their inner loops have no branch on it.
template <Distance K>
struct DistanceTag {
  static constexpr Distance value = K;
};

template <typename F>
inline bool VisitDistance(Distance k, F&& f) {
  switch (k) {
    case Distance::kEuclidean: f(DistanceTag<Distance::kEuclidean>{}); return true;
    case Distance::kCosine: f(DistanceTag<Distance::kCosine>{}); return true;
    case Distance::kManhattan: f(DistanceTag<Distance::kManhattan>{}); return true;
  }
  return false;
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_DISTANCE_H_
