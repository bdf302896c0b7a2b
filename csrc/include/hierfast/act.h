// Activation functions and their derivatives, shared by the CPU and CUDA conv
// epilogues (csrc/cpu/conv_act.cpp, csrc/cuda/conv_act.cu). Codes must match
// hierfast/ops/conv_act.py (ACTIVATIONS).
//
// float uses branch-free polynomial/rational exp, erfc and tanh (Cephes; a fitted rational,
// relative error ~1e-7) so the CPU loops vectorise (libm calls would not);
// double uses the libm functions (gradcheck precision).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if !defined(__CUDACC__)
#include <stdexcept>
#include <string>
#include <type_traits>
#endif

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: an out-of-line fexp() call would keep the loops from vectorising
#define HF_HD inline __attribute__((always_inline))
#else
#define HF_HD inline
#endif

namespace hierfast::act {

#if !defined(__CUDACC__)
// float overloads (the global C functions would promote to double and not vectorise)
using std::erfc;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::tanh;
#endif

enum Code : int {
  kIdentity = 0, kReLU = 1, kReLU6 = 2, kLeakyReLU = 3, kGELU = 4, kGELUTanh = 5,
  kSiLU = 6, kHardswish = 7, kSigmoid = 8, kTanh = 9, kMish = 10
};

#if !defined(__CUDACC__)
// Runtime activation code -> f(std::integral_constant<int, A>{}): each activation gets its
// own instance of the caller's loops, with A a compile-time constant (so they vectorise).
// `what` names the caller in the error for an unknown code.
template <typename F>
void dispatch(int code, const char* what, F&& f) {
  switch (code) {
    case kIdentity: return f(std::integral_constant<int, kIdentity>{});
    case kReLU: return f(std::integral_constant<int, kReLU>{});
    case kReLU6: return f(std::integral_constant<int, kReLU6>{});
    case kLeakyReLU: return f(std::integral_constant<int, kLeakyReLU>{});
    case kGELU: return f(std::integral_constant<int, kGELU>{});
    case kGELUTanh: return f(std::integral_constant<int, kGELUTanh>{});
    case kSiLU: return f(std::integral_constant<int, kSiLU>{});
    case kHardswish: return f(std::integral_constant<int, kHardswish>{});
    case kSigmoid: return f(std::integral_constant<int, kSigmoid>{});
    case kTanh: return f(std::integral_constant<int, kTanh>{});
    case kMish: return f(std::integral_constant<int, kMish>{});
  }
  throw std::invalid_argument(std::string(what) + ": unknown activation code");
}
#endif

// Derivatives of these are computed from the activation's OUTPUT y (no extra tensor
// saved: y is the op's result); the others need the pre-activation z.
HF_HD bool grad_from_output(int code, double alpha) {
  return code == kIdentity || code == kReLU || code == kReLU6 || code == kSigmoid ||
         code == kTanh || (code == kLeakyReLU && alpha > 0.0);
}

#if defined(__CUDACC__)
HF_HD float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
#else
HF_HD float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
#endif

// Branch-free min/max/abs as selects (fminf/fmaxf have NaN rules that keep GCC from
// vectorising them). A NaN first argument propagates (NaN in -> NaN out, as torch).
template <typename T> HF_HD T vmax(T a, T b) { return a < b ? b : a; }
template <typename T> HF_HD T vmin(T a, T b) { return a > b ? b : a; }
template <typename T> HF_HD T vabs(T a) { return a < (T)0 ? -a : a; }

// exp(x) for float: Cephes expf (range reduction by ln2, degree-6 polynomial).
// Rounding to nearest via the 1.5 * 2^23 trick (vectorises; floorf does not).
// Saturates like exp: 0 below x = -87.7 (no denormals) and +inf above 88.4 (2^n's exponent
// field is clamped to [0, 255]). It used to clamp x to [-87, 88] instead, which left
// sigmoid(-1e30) = 6e-39, not 0: SiLU, Mish and tanh-GELU then gave -6e-9 at z = -1e30, -0.6
// at -1e38 (a bfloat16 value) and -inf at -inf, where torch gives -0 and NaN.
HF_HD float fexp(float x) {
  x = vmin(vmax(x, -88.8f), 88.8f);
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t k = (int32_t)n + 127;  // in [-1, 255]
  k = k < 0 ? 0 : k;
  return p * bits_to_float((uint32_t)k << 23);
}
HF_HD double fexp(double x) { return exp(x); }

// tanh: Cephes tanhf (odd polynomial below 0.625, exp form above).
HF_HD float ftanh(float x) {
  float a = vabs(x);
  float z = x * x;
  float small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z +
                  1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
  float big = 1.0f - 2.0f / (fexp(2.0f * a) + 1.0f);
  big = x < 0.0f ? -big : big;
  return a < 0.625f ? small : big;
}
HF_HD double ftanh(double x) { return tanh(x); }

// Standard normal CDF, accurate in both tails (relative error in the lower tail), as
// Phi(z) = 1 - e (z >= 0) or e (z < 0), e = erfc(|z| / sqrt 2) / 2, computed from
// E = exp(-z^2 / 2) (passed in: the GELU derivative needs it too) as e = E * erfcx(a) / 2,
// a = |z| / sqrt 2. erfcx on [0, 9.5] is a degree-4/5 rational fitted for relative error
// 5e-9, below float32 rounding (it replaced Numerical Recipes' erfcc, 2026-12-01: 2x smaller
// GELU error, float32 GELU within 4.3e-6 relative of float64 over [-13, 13], and the derivative
// shares its exp). Beyond a = 9.5 (|z| > 13.4) e is 0, as in float32 it nearly is (3.6e-41):
// that also gives Phi(+-inf) = 1 / 0 exactly (z * Phi = NaN at -inf, as torch).
HF_HD float norm_cdf_e(float z, float E) {
  const float a = vabs(z) * 0.70710678118654752f;
  const float p = ((((3.205829887e-02f * a + 2.256885533e-01f) * a + 7.241809398e-01f) * a + 1.231301611e+00f) * a + 1.000000005e+00f);
  const float q = (((((5.682102542e-02f * a + 4.000526127e-01f) * a + 1.311513993e+00f) * a + 2.386788014e+00f) * a + 2.359681275e+00f) * a + 1.0f);
  float e = 0.5f * E * (p / q);
  e = a > 9.5f ? 0.0f : e;  // also drops inf/inf = NaN of the rational at a = inf
  return z >= 0.0f ? 1.0f - e : e;
}
HF_HD double norm_cdf_e(double z, double) {
  const double e = 0.5 * erfc(vabs(z) * 0.70710678118654752440);
  return z >= 0.0 ? 1.0 - e : e;
}
HF_HD float norm_cdf(float z) { return norm_cdf_e(z, fexp(-0.5f * z * z)); }
HF_HD double norm_cdf(double z) { return norm_cdf_e(z, 0.0); }  // the double form needs no E
template <typename T> HF_HD T sigmoid(T z) { return (T)1 / ((T)1 + fexp(-z)); }

// tanh(softplus(z)) = n / (n + 2), n = e^z (e^z + 2); 1 beyond z = 20 (float-exact).
template <typename T> HF_HD T tanh_softplus(T z) {
  T e = fexp(vmin(z, (T)20));
  T n = e * (e + (T)2);
  return z > (T)20 ? (T)1 : n / (n + (T)2);
}

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kGeluC = 0.044715;

template <typename T> HF_HD T forward(int code, T z, T alpha) {
  switch (code) {
    case kReLU: return z < (T)0 ? (T)0 : z;  // NaN passes
    case kReLU6: return vmin(vmax(z, (T)0), (T)6);
    case kLeakyReLU: return z > (T)0 ? z : z * alpha;
    case kGELU: return z * norm_cdf(z);
    case kGELUTanh: {  // 0.5 z (1 + tanh(u)) = z * sigmoid(2u)
      T u = (T)kSqrt2OverPi * (z + (T)kGeluC * z * z * z);
      return z * sigmoid((T)2 * u);
    }
    case kSiLU: return z * sigmoid(z);
    case kHardswish: return z * vmin(vmax(z + (T)3, (T)0), (T)6) * (T)(1.0 / 6.0);
    case kSigmoid: return sigmoid(z);
    case kTanh: return ftanh(z);
    case kMish: return z * tanh_softplus(z);
    default: return z;
  }
}

// d act / d z, from y (grad_from_output codes) or from z (the others). Boundary
// conventions follow torch's (vectorised) backward kernels, NaN included: at a NaN input
// ReLU's derivative is 1, ReLU6's 0, leaky ReLU's the slope; the others give NaN.
template <typename T> HF_HD T derivative(int code, T s, T alpha) {
  switch (code) {
    case kReLU: return s <= (T)0 ? (T)0 : (T)1;                     // s = y
    case kReLU6: return (s > (T)0 && s < (T)6) ? (T)1 : (T)0;       // s = y (NaN: 0, as torch)
    case kLeakyReLU: return s > (T)0 ? (T)1 : alpha;                // s = y (alpha > 0) or z
    case kSigmoid: return s * ((T)1 - s);                           // s = y
    case kTanh: return (T)1 - s * s;                                // s = y
    case kGELU: {  // Phi(s) + s phi(s), one exp for both
      const T E = fexp((T)-0.5 * s * s);
      return norm_cdf_e(s, E) + s * (T)kInvSqrt2Pi * E;
    }
    case kGELUTanh: {
      T u = (T)kSqrt2OverPi * (s + (T)kGeluC * s * s * s);
      T sg = sigmoid((T)2 * u);
      // Far out sg (1 - sg) is exactly 0: multiplied first, and s^2 capped (beyond |s| = 100 it
      // no longer matters), so that no overflow (2 s, s^2 in float) turns 0 * inf into NaN
      // where the derivative is 1 or 0
      return sg + s * (sg * ((T)1 - sg)) * (T)(2 * kSqrt2OverPi) *
                      ((T)1 + (T)(3 * kGeluC) * vmin(s * s, (T)1e4));
    }
    case kSiLU: {
      T sg = sigmoid(s);
      return sg * ((T)1 + s * ((T)1 - sg));
    }
    // the kinks as torch: 0 at -3, 1 at +3 (the one-sided derivatives away from the ramp)
    case kHardswish: return s <= (T)-3 ? (T)0 : (s >= (T)3 ? (T)1 : s / (T)3 + (T)0.5);
    case kMish: {
      T t = tanh_softplus(s);
      return t + s * sigmoid(s) * ((T)1 - t * t);
    }
    default: return (T)1;
  }
}

}  // namespace hierfast::act
