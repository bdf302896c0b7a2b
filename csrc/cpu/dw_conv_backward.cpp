// CPU backward of a depthwise conv + bias + activation, fused (channels_last, float32 or
// bfloat16 tensors with float32 arithmetic and float64 weight/bias sums, one filter per
// channel, 3x3 or 5x5 filters, channels a multiple of 16, any stride, padding and dilation).
//
// Task = (image n, block of 16 channels = one 512-bit vector). Per task:
// 1. grad_z = grad_y * act'(saved) for the block, into a zero-haloed scratch image at input
//    resolution: output pixel (oh, ow) goes to (oh * sh, ow * sw), every other position stays
//    zero (so strided layers need no divisibility tests below); the bias gradient is summed on
//    the way;
// 2. one pass over the input pixels in gather form: with g = the haloed grad_z,
//      grad_x[ih, iw]  = sum_t w[t] * g[ih + ph - kh*dh, iw + pw - kw*dw]   (g at input resolution)
//      grad_w[t]      += x[ih, iw] * g[same]
//    The filter taps' weights and weight-gradient sums stay in registers; each grad_x element
//    is written once, with no bounds checks (the halo is zero). Per pixel and 16 channels:
//    2 * taps FMAs, taps + 1 loads, 1 store.
// The unfused path writes grad_z to memory, reads it back, and runs torch's convolution
// backward. Activation math: csrc/include/hierfast/act.h.
#pragma GCC optimize("no-trapping-math")
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "hierfast/act.h"
#include "hierfast/cpu_kernels.h"
#include "hierfast/depthwise.h"

namespace hierfast::cpu {
namespace {

using dw::Geometry;
using dw::kLanes;

// Element type S of the tensors (float, or uint16_t holding bfloat16 bits) <-> float.
inline float ldf(float v) { return v; }
inline float ldf(uint16_t v) { return bf16_bits_to_float(v); }
inline float stf(float v, float) { return v; }
inline uint16_t stf(float v, uint16_t) { return float_to_bf16(v); }

// grad_z of one (image, channel block) into g (GH x GW x kLanes, zero halo), bias sums to gb.
template <int A, typename S>
HIERFAST_SIMD_CLONES void fill_grad_z(const S* __restrict__ gy, const S* __restrict__ saved,
                                      float* __restrict__ g, float* __restrict__ gb, const Geometry& q,
                                      int64_t n, int64_t c0, int64_t r0, int64_t col0, int64_t GW, float alpha) {
  for (int64_t oh = 0; oh < q.OH; ++oh) {
    float* grow = g + ((oh * q.sh - r0) * GW - col0) * kLanes;
    for (int64_t ow = 0; ow < q.OW; ++ow) {
      const int64_t o = ((n * q.OH + oh) * q.OW + ow) * q.C + c0;
      float* d = grow + ow * q.sw * kLanes;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float v = ldf(gy[o + l]) * act::derivative<float>(A, ldf(saved[o + l]), alpha);
        d[l] = v;
        gb[l] += v;
      }
    }
  }
}

// torch's weight gradient also multiplies grad_z by the zero padding: a non-finite grad_z
// makes NaN every tap through which its output reads padding. The gather never visits the
// padding, so those products are added here (only for tasks holding a non-finite grad_z).
template <int TAPS>
void add_padding_taps(const float* __restrict__ g, float* __restrict__ gw, const Geometry& q, int64_t r0,
                      int64_t col0, int64_t GW) {
  for (int64_t oh = 0; oh < q.OH; ++oh)
    for (int64_t ow = 0; ow < q.OW; ++ow) {
      const float* gz = g + ((oh * q.sh - r0) * GW + ow * q.sw - col0) * kLanes;
      for (int t = 0; t < TAPS; ++t) {
        const int64_t ih = oh * q.sh - q.ph + (t / q.KW) * q.dh, iw = ow * q.sw - q.pw + (t % q.KW) * q.dw;
        if (ih >= 0 && ih < q.H && iw >= 0 && iw < q.W) continue;
        for (int l = 0; l < kLanes; ++l) gw[t * kLanes + l] += gz[l] * 0.f;
      }
    }
}

// v is neither NaN nor inf (inf - inf and NaN - NaN are NaN): one subtraction and compare.
inline bool finite_value(float v) { return v - v == 0.f; }

// The gather pass for one (image, channel block): grad_x (when want_x) and the weight sums.
// off[t] = element offset of tap t in g relative to the pixel's own position. g is zero
// where no output sits, so a tap there adds x * 0: exact for finite x, but NaN for a NaN or
// inf x that no output reads (torch's backward gives such taps nothing). A non-finite sum
// reveals such an x for free; that task then reruns with FINITE_ONLY (non-finite x taken as
// 0) and add_nonfinite_x adds them through real taps only. (Any order of a sum holding NaN
// or inf gives the same NaN or inf.)
template <int TAPS, typename S, bool FINITE_ONLY>
HIERFAST_SIMD_CLONES void gather(const S* __restrict__ x, const float* __restrict__ g,
                                 const float* __restrict__ wv, S* __restrict__ gx, float* __restrict__ gw,
                                 const int64_t* __restrict__ off, const Geometry& q, int64_t n, int64_t c0,
                                 int64_t GW, int64_t base_r, int64_t base_c, bool want_x) {
  float acc[TAPS][kLanes] = {};
  float w[TAPS][kLanes];
  for (int t = 0; t < TAPS; ++t)
    for (int l = 0; l < kLanes; ++l) w[t][l] = wv[t * kLanes + l];
  for (int64_t ih = 0; ih < q.H; ++ih) {
    const float* grow = g + ((ih + base_r) * GW + base_c) * kLanes;
    for (int64_t iw = 0; iw < q.W; ++iw) {
      const int64_t i = ((n * q.H + ih) * q.W + iw) * q.C + c0;
      const float* gp = grow + iw * kLanes;
      float sx[kLanes] = {};
      float xi[kLanes];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float v = ldf(x[i + l]);
        xi[l] = FINITE_ONLY && !finite_value(v) ? 0.f : v;
      }
#pragma GCC unroll 25
      for (int t = 0; t < TAPS; ++t) {
        const float* gt = gp + off[t];
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          acc[t][l] += xi[l] * gt[l];
          sx[l] += w[t][l] * gt[l];
        }
      }
      if (want_x) {
        S* o = gx + i;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) o[l] = stf(sx[l], S{});
      }
    }
  }
  for (int t = 0; t < TAPS; ++t)
    for (int l = 0; l < kLanes; ++l) gw[t * kLanes + l] = acc[t][l];
}

inline bool all_finite(const float* v, int64_t len) {
  for (int64_t i = 0; i < len; ++i)
    if (!finite_value(v[i])) return false;
  return true;
}

// Bit k of the result: filter tap k (along one axis) of input index i lands on a real output
// (o = (i + p - k*d) / s with no remainder, 0 <= o < O), not on the halo or a stride gap.
inline unsigned taps_read(int64_t i, int64_t p, int64_t d, int64_t s, int64_t O, int64_t K) {
  unsigned m = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = i + p - k * d;
    if (r >= 0 && r % s == 0 && r / s < O) m |= 1u << k;
  }
  return m;
}

// The non-finite x of one (image, channel block), which gather took as 0, times grad_z
// through the taps whose output exists (rare: only tasks holding a NaN or inf x).
template <int TAPS, typename S>
void add_nonfinite_x(const S* x, const float* g, float* gw, const int64_t* off, const Geometry& q, int64_t n,
                     int64_t c0, int64_t GW, int64_t base_r, int64_t base_c) {
  for (int64_t ih = 0; ih < q.H; ++ih) {
    const unsigned rows = taps_read(ih, q.ph, q.dh, q.sh, q.OH, q.KH);
    for (int64_t iw = 0; iw < q.W; ++iw) {
      const unsigned cols = taps_read(iw, q.pw, q.dw, q.sw, q.OW, q.KW);
      const int64_t i = ((n * q.H + ih) * q.W + iw) * q.C + c0;
      const float* gp = g + ((ih + base_r) * GW + base_c + iw) * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const float v = ldf(x[i + l]);
        if (finite_value(v)) continue;
        for (int t = 0; t < TAPS; ++t)
          if ((rows >> (t / q.KW) & 1u) && (cols >> (t % q.KW) & 1u)) gw[t * kLanes + l] += v * gp[off[t] + l];
      }
    }
  }
}

// grad_x of one (image, channel block) again, for a block holding a NaN or inf weight: the
// gather adds w * 0 at halo and stride-gap taps (g is zero where no output sits), NaN for such
// a w, where torch's grad_x takes only taps whose output exists. Here a non-finite w counts
// only through those; finite ones are used as in gather (same order: same bits).
template <int TAPS, typename S>
void regather_x_nonfinite_w(const float* g, const float* wv, S* gx, const int64_t* off, const Geometry& q,
                            int64_t n, int64_t c0, int64_t GW, int64_t base_r, int64_t base_c) {
  float w[TAPS][kLanes];
  for (int64_t ih = 0; ih < q.H; ++ih) {
    const unsigned rows = taps_read(ih, q.ph, q.dh, q.sh, q.OH, q.KH);
    for (int64_t iw = 0; iw < q.W; ++iw) {
      const unsigned cols = taps_read(iw, q.pw, q.dw, q.sw, q.OW, q.KW);
      for (int t = 0; t < TAPS; ++t) {
        const bool real = (rows >> (t / q.KW) & 1u) && (cols >> (t % q.KW) & 1u);
        for (int l = 0; l < kLanes; ++l) {
          const float v = wv[t * kLanes + l];
          w[t][l] = real || finite_value(v) ? v : 0.f;
        }
      }
      const float* gp = g + ((ih + base_r) * GW + base_c + iw) * kLanes;
      float sx[kLanes] = {};
      for (int t = 0; t < TAPS; ++t)
        for (int l = 0; l < kLanes; ++l) sx[l] += w[t][l] * gp[off[t] + l];
      S* o = gx + ((n * q.H + ih) * q.W + iw) * q.C + c0;
      for (int l = 0; l < kLanes; ++l) o[l] = stf(sx[l], S{});
    }
  }
}

template <int A, int TAPS, typename S>
void run(const S* gy, const S* saved, const S* x, const S* w, S* gx, double* gw_out,
         double* gb_out, const Geometry& q, float alpha, bool want_x) {
  const int64_t C = q.C, blocks = C / kLanes, tasks = q.N * blocks;
  // Haloed grad_z coordinates: rows r = ih + ph - kh*dh over all ih, kh (columns alike); output
  // row oh sits at r = oh * sh. The buffer spans [r0, r1] x [col0, col1] and holds zeros
  // wherever no output pixel sits.
  const int64_t r0 = std::min<int64_t>(0, q.ph - (q.KH - 1) * q.dh);
  const int64_t r1 = std::max<int64_t>((q.OH - 1) * q.sh, q.H - 1 + q.ph);
  const int64_t col0 = std::min<int64_t>(0, q.pw - (q.KW - 1) * q.dw);
  const int64_t col1 = std::max<int64_t>((q.OW - 1) * q.sw, q.W - 1 + q.pw);
  const int64_t GH = r1 - r0 + 1, GW = col1 - col0 + 1;
  std::vector<int64_t> off(TAPS);
  for (int64_t kh = 0; kh < q.KH; ++kh)
    for (int64_t kw = 0; kw < q.KW; ++kw) off[kh * q.KW + kw] = (-kh * q.dh * GW - kw * q.dw) * kLanes;
  // weights by block: [block][tap][lane]
  std::vector<float> wv(blocks * TAPS * kLanes);
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < TAPS; ++t) wv[((c / kLanes) * TAPS + t) * kLanes + c % kLanes] = ldf(w[c * TAPS + t]);
  std::vector<float> parts(tasks * (TAPS + 1) * kLanes, 0.f);
  std::vector<char> w_finite(blocks);  // per channel block: no NaN/inf weight
  for (int64_t b = 0; b < blocks; ++b) w_finite[b] = all_finite(wv.data() + b * TAPS * kLanes, TAPS * kLanes);
#pragma omp parallel
  {
    std::vector<float> g(GH * GW * kLanes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t n = k / blocks, b = k % blocks, c0 = b * kLanes;
      std::fill(g.begin(), g.end(), 0.f);
      float* part = parts.data() + k * (TAPS + 1) * kLanes;
      fill_grad_z<A, S>(gy, saved, g.data(), part + TAPS * kLanes, q, n, c0, r0, col0, GW, alpha);
      // pixel (ih, iw) sits at buffer row ih + ph - r0, column iw + pw - col0
      const int64_t br = q.ph - r0, bc = q.pw - col0;
      const float* wb = wv.data() + b * TAPS * kLanes;
      gather<TAPS, S, false>(x, g.data(), wb, gx, part, off.data(), q, n, c0, GW, br, bc, want_x);
      if (!all_finite(part, TAPS * kLanes)) {  // a NaN/inf x or grad_z (or an overflow): rare
        gather<TAPS, S, true>(x, g.data(), wb, gx, part, off.data(), q, n, c0, GW, br, bc, want_x);
        add_nonfinite_x<TAPS, S>(x, g.data(), part, off.data(), q, n, c0, GW, br, bc);
      }
      if (!all_finite(part + TAPS * kLanes, kLanes)) add_padding_taps<TAPS>(g.data(), part, q, r0, col0, GW);
      if (want_x && !w_finite[b]) regather_x_nonfinite_w<TAPS, S>(g.data(), wb, gx, off.data(), q, n, c0, GW, br, bc);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const int64_t b = c / kLanes, l = c % kLanes;
    for (int t = 0; t <= TAPS; ++t) {
      double s = 0.0;
      for (int64_t n = 0; n < q.N; ++n) s += (double)parts[((n * blocks + b) * (TAPS + 1) + t) * kLanes + l];
      if (t < TAPS) gw_out[c * TAPS + t] = s;
      else gb_out[c] = s;
    }
  }
}

template <int TAPS, typename S>
void by_act(int code, const void* gy, const void* s, const void* x, const void* w, void* gx, double* gw,
            double* gb, const Geometry& q, float alpha, bool want_x) {
  act::dispatch(code, "dw_conv_act_backward", [&](auto a) {
    run<decltype(a)::value, TAPS, S>(static_cast<const S*>(gy), static_cast<const S*>(s), static_cast<const S*>(x),
                                     static_cast<const S*>(w), static_cast<S*>(gx), gw, gb, q, alpha, want_x);
  });
}

}  // namespace

void dw_conv_act_backward(const void* grad_y, const void* saved, const void* x, const void* w, void* grad_x,
                          double* grad_w, double* grad_b, DType dtype, const int64_t* geometry, int act_code,
                          double alpha, bool want_x) {
  if (dtype != DType::kFloat32 && dtype != DType::kBFloat16)
    throw std::invalid_argument(std::string("dw_conv_act_backward: float32 or bfloat16, got ") + dtype_name(dtype));
  const Geometry q = dw::geometry(geometry, "dw_conv_act_backward", false);
  const float a = (float)alpha;
  if (dtype == DType::kBFloat16) {
    if (q.KH == 3) return by_act<9, uint16_t>(act_code, grad_y, saved, x, w, grad_x, grad_w, grad_b, q, a, want_x);
    return by_act<25, uint16_t>(act_code, grad_y, saved, x, w, grad_x, grad_w, grad_b, q, a, want_x);
  }
  if (q.KH == 3) return by_act<9, float>(act_code, grad_y, saved, x, w, grad_x, grad_w, grad_b, q, a, want_x);
  return by_act<25, float>(act_code, grad_y, saved, x, w, grad_x, grad_w, grad_b, q, a, want_x);
}

}  // namespace hierfast::cpu
