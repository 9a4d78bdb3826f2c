// The dtypes the op supports, listed once, and a dispatcher from a runtime
// dtype to the storage type. Host and device code both use it.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_DTYPES_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_DTYPES_H_

#include <cstdint>

#include "core/common/numeric_types.h"

namespace fused_contrastive {

enum class DType : int { kBool, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64 };

constexpr DType kAllDTypes[] = {DType::kBool,     DType::kInt32,   DType::kInt64,  DType::kFloat16,
                                DType::kBFloat16, DType::kFloat32, DType::kFloat64};

// NumPy / TensorFlow spelling.
inline const char* DTypeName(DType t) {
  switch (t) {
    case DType::kBool: return "bool";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// Distances (and so outputs) are floating point; labels may be any DType.
inline bool IsDistanceDType(DType t) {
  return t == DType::kFloat16 || t == DType::kBFloat16 || t == DType::kFloat32 ||
         t == DType::kFloat64;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type of t; false if t has none.
// Device code calls it too (LabelAs); nvcc's check of host-only callers is
// off for it, since host code passes host-only lambdas.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename F>
FC_HOST_DEVICE bool VisitDType(DType t, F&& f) {
  switch (t) {
    case DType::kBool: f(TypeTag<bool_t>{}); return true;
    case DType::kInt32: f(TypeTag<int32_t>{}); return true;
    case DType::kInt64: f(TypeTag<int64_t>{}); return true;
    case DType::kFloat16: f(TypeTag<half_t>{}); return true;
    case DType::kBFloat16: f(TypeTag<bfloat16_t>{}); return true;
    case DType::kFloat32: f(TypeTag<float>{}); return true;
    case DType::kFloat64: f(TypeTag<double>{}); return true;
  }
  return false;
}

// labels[i] of the run-time dtype `type`, as C: a kernel that reads its
// labels through it is compiled once for every label dtype, not once each.
template <typename C>
FC_HOST_DEVICE C LabelAs(const void* labels, DType type, int64_t i) {
  C value(0);
  VisitDType(type, [&](auto tag) {
    using L = typename decltype(tag)::type;
    value = Convert<C>::from(static_cast<const L*>(labels)[i]);
  });
  return value;
}

template <typename F>
bool VisitDistanceDType(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16: f(TypeTag<half_t>{}); return true;
    case DType::kBFloat16: f(TypeTag<bfloat16_t>{}); return true;
    case DType::kFloat32: f(TypeTag<float>{}); return true;
    case DType::kFloat64: f(TypeTag<double>{}); return true;
    default: return false;
  }
}

// Calls f(TypeTag<L>{}, TypeTag<D>{}) for a supported (label, distance) pair.
template <typename F>
bool VisitLabelAndDistance(DType label, DType distance, F&& f) {
  bool ok = false;
  VisitDType(label, [&](auto l) { ok = VisitDistanceDType(distance, [&](auto d) { f(l, d); }); });
  return ok;
}

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_DTYPES_H_
