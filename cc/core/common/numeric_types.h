// Storage types and conversions shared by every kernel (CPU, CUDA, pybind11).
//
// The kernels must not depend on TensorFlow or Eigen: the GPU check machine has
// neither. half_t and bfloat16_t are therefore plain 16-bit wrappers with the
// same layout as Eigen::half / Eigen::bfloat16 / __half / __nv_bfloat16 / the
// NumPy and ml_dtypes scalars, so callers reinterpret their buffers as these.
#ifndef FUSED_CONTRASTIVE_CORE_COMMON_NUMERIC_TYPES_H_
#define FUSED_CONTRASTIVE_CORE_COMMON_NUMERIC_TYPES_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__
#else
#define FC_HOST_DEVICE
#endif

namespace fused_contrastive {

// bool's storage byte, read as a byte: a bool object holding anything but 0
// or 1 is undefined behaviour in C++, yet TensorFlow (tf.io.decode_raw) and
// NumPy (np.frombuffer) can hand us such bytes. Any nonzero byte is true.
struct bool_t {
  uint8_t bits;
};
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

FC_HOST_DEVICE inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

FC_HOST_DEVICE inline float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32 is exact; subnormal halves are mant * 2^-24.
FC_HOST_DEVICE inline float half_to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(float_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// binary32 -> binary16, round to nearest even (what Eigen, NumPy and CUDA do).
FC_HOST_DEVICE inline half_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  uint16_t out;
  if (x > 0x7f800000u) {
    out = 0x7e00u;  // quiet NaN
  } else if (x >= 0x477ff000u) {
    out = 0x7c00u;  // >= 65520 rounds to infinity
  } else if (x < 0x38800000u) {
    // Below the smallest normal half: adding 0.5f aligns the value so that the
    // FPU's own round-to-nearest-even drops exactly the bits binary16 cannot hold.
    const float aligned = bits_float(x) + 0.5f;
    out = static_cast<uint16_t>(float_bits(aligned) - 0x3f000000u);
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    // Rebias the exponent (127 -> 15) and add just under half an ulp, plus the
    // odd bit, so truncation rounds to nearest with ties to even.
    x += 0xc8000fffu + odd;
    out = static_cast<uint16_t>(x >> 13);
  }
  return half_t{static_cast<uint16_t>(out | sign)};
}

FC_HOST_DEVICE inline float bfloat16_to_float(bfloat16_t b) {
  return bits_float(static_cast<uint32_t>(b.bits) << 16);
}

FC_HOST_DEVICE inline bfloat16_t float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return bfloat16_t{static_cast<uint16_t>((x >> 16) | 0x0040u)};  // quiet NaN, sign kept
  }
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return bfloat16_t{static_cast<uint16_t>((x + rounding) >> 16)};
}

// 16-bit floats are computed in float32; everything else in its own precision
// except double, which stays double.
template <typename T>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};
template <typename T>
using ComputeType = typename ComputeTypeOf<T>::type;

template <typename C>
struct Convert {
  template <typename T>
  FC_HOST_DEVICE static C from(T v) {
    return static_cast<C>(v);
  }
  FC_HOST_DEVICE static C from(bool_t v) { return v.bits != 0 ? C(1) : C(0); }
  FC_HOST_DEVICE static C from(half_t v) { return static_cast<C>(half_to_float(v)); }
  FC_HOST_DEVICE static C from(bfloat16_t v) { return static_cast<C>(bfloat16_to_float(v)); }
};

template <typename T>
struct Store {
  template <typename C>
  FC_HOST_DEVICE static T to(C v) {
    return static_cast<T>(v);
  }
};
template <>
struct Store<half_t> {
  FC_HOST_DEVICE static half_t to(float v) { return float_to_half(v); }
};
template <>
struct Store<bfloat16_t> {
  FC_HOST_DEVICE static bfloat16_t to(float v) { return float_to_bfloat16(v); }
};

}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_CORE_COMMON_NUMERIC_TYPES_H_
