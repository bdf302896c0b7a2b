// Shared helpers for hierfast's compiled core. Nothing here depends on torch:
// kernels receive raw pointers, element strides and a dtype code from Python,
// which has already validated shapes and devices (DESIGN.md principle 6).
#pragma once
#include <cstdint>
#include <cstring>

// Runtime-dispatched SIMD clones of hot loops (AVX-512, AVX2, baseline): the build
// stays portable (no -march=native) yet runs wide vectors where the CPU has them.
// Note: OpenMP-outlined regions do not inherit the attribute, so parallel loops call
// a cloned per-row function.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define HIERFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HIERFAST_SIMD_CLONES
#endif

namespace hierfast {

// Must match hierfast/_dtypes.py.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// IEEE half -> float without relying on compiler extensions (portable, exact).
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: renormalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      man &= 0x3FFu;
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x7FFFFFu)) return (uint16_t)((b >> 16) | 0x40);
  b += 0x7FFFu + ((b >> 16) & 1u);  // round to nearest even
  return (uint16_t)(b >> 16);
}

// Load element of any supported dtype as double.
template <DType D> struct Load;
template <> struct Load<DType::kFloat16> {
  using T = uint16_t;
  static inline double get(const T* p) { return half_bits_to_float(*p); }
};
template <> struct Load<DType::kBFloat16> {
  using T = uint16_t;
  static inline double get(const T* p) { return bf16_bits_to_float(*p); }
};
template <> struct Load<DType::kFloat32> {
  using T = float;
  static inline double get(const T* p) { return *p; }
};
template <> struct Load<DType::kFloat64> {
  using T = double;
  static inline double get(const T* p) { return *p; }
};

}  // namespace hierfast
