// CPU forward of a depthwise conv + bias + activation in ONE pass (channels_last, float32,
// one filter per channel, square 3x3 or 5x5 filters, channels a multiple of 16; any stride,
// padding and dilation).
//
// Why: a depthwise layer does only KH*KW FMAs per output, so every extra sweep over the output
// shows. Eager conv + activation sweeps it twice; oneDNN's post-op convolution fuses the
// activation, but measured slower than this kernel for ReLU6, SiLU, Hardswish, sigmoid, tanh
// and has no Mish; training a smooth activation needs the pre-activation z saved as well (oneDNN
// conv, then a second pass for y), and the statistics tap needs a pass of its own after torch's
// convolution. Here each output vector is accumulated in a register and leaves through the
// activation: y is written once, z in the same pass when asked for, and per-channel statistics
// of y (sum, sum of squares, count > 0; float64) are summed on the way. Where it is used:
// hierfast/ops/conv_act.py, _depthwise_forward_wins (by measurement).
//
// Task = (image n, block of 16 channels = one 512-bit vector, band of output rows). Per output
// pixel and 16 channels: KH*KW loads and FMAs, one store. Rows of taps outside the image are
// skipped per output row; columns are checked only in the left/right border, so the interior
// loop has no bounds checks. Activation math: csrc/include/hierfast/act.h.
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

// Where a task writes: y always; z (pre-activation) and the statistics partials (3 x kLanes
// float64: sums, sums of squares, positive counts) when non-null.
struct Out {
  float* y;
  float* z;
  double* st;
};

// 16 float32 lanes as one value: GCC keeps it in a register (a float[16] accumulator updated
// under per-tap conditions was spilled to the stack after every FMA: a store-forwarding chain
// that ran 3x slower than torch's convolution). Lowered to narrower vectors in non-AVX-512 clones.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads/stores
inline __attribute__((always_inline)) v16 ld(const float* p) { return *reinterpret_cast<const v16u*>(p); }

constexpr int kTile = 4;  // output pixels accumulated together: independent FMA chains

// Activation, stores and statistics of P output vectors (16 channels each; vector p goes to
// y + p * step, z + p * step). The P vectors go through the activation in one loop: its
// independent chains interleave (measured ~10 % faster GELU than one vector at a time).
template <int A, int P>
inline __attribute__((always_inline)) void finish(const v16* acc, float* __restrict__ y, float* __restrict__ z,
                                                  int64_t step, double* __restrict__ st, float alpha) {
  float a[P * kLanes], v[P * kLanes];
  for (int p = 0; p < P; ++p) {
    *reinterpret_cast<v16u*>(a + p * kLanes) = acc[p];
    if (z) *reinterpret_cast<v16u*>(z + p * step) = acc[p];
  }
#pragma omp simd
  for (int i = 0; i < P * kLanes; ++i) v[i] = act::forward<float>(A, a[i], alpha);
  for (int p = 0; p < P; ++p) *reinterpret_cast<v16u*>(y + p * step) = ld(v + p * kLanes);
  if (st) {
    for (int p = 0; p < P; ++p) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const double d = v[p * kLanes + l];
        st[l] += d;
        st[kLanes + l] += d * d;
        st[2 * kLanes + l] += d > 0.0 ? 1.0 : 0.0;
      }
    }
  }
}

// One output pixel (16 channels) with every tap tested against the image (border pixels).
// always_inline, not a lambda: it must be compiled for the caller's target clone.
template <int A, int K>
inline __attribute__((always_inline)) void checked(const float* const* xr, const v16* w, v16 b, const Geometry& q,
                                                   int64_t ow, float* yr, float* zr, double* st, float alpha) {
  v16 acc = b;
  const int64_t iw0 = ow * q.sw - q.pw;
  for (int kh = 0; kh < K; ++kh) {
    if (!xr[kh]) continue;
    for (int kw = 0; kw < K; ++kw) {
      const int64_t iw = iw0 + kw * q.dw;
      if (iw >= 0 && iw < q.W) acc += w[kh * K + kw] * ld(xr[kh] + iw * q.C);
    }
  }
  finish<A, 1>(&acc, yr + ow * q.C, zr ? zr + ow * q.C : nullptr, 0, st, alpha);
}

// Output rows [oh0, oh1) of image n, channels [c0, c0 + 16). In rows whose K tap rows all lie in
// the image, output columns [ow_lo, ow_hi) (every tap column inside) run unchecked, kTile pixels
// at a time; every other pixel checks each tap.
template <int A, int K>
HIERFAST_SIMD_CLONES void rows(const float* __restrict__ x, const float* __restrict__ wv,
                               const float* __restrict__ bias, const Out& out, const Geometry& q, int64_t n,
                               int64_t c0, int64_t oh0, int64_t oh1, int64_t ow_lo, int64_t ow_hi, float alpha) {
  v16 w[K * K];
  for (int t = 0; t < K * K; ++t) w[t] = ld(wv + t * kLanes);
  const v16 b = ld(bias);
  const int64_t C = q.C, sC = q.sw * C, dC = q.dw * C;
  // K = 5 would need 8 + 25 + 4 vector registers in the shared-load form: it keeps the other one
  const bool unit = K == 3 && q.sw == 1 && q.dw == 1;
  double st[3 * kLanes] = {};
  double* stp = out.st ? st : nullptr;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* xr[K];
    bool full = true;
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = oh * q.sh - q.ph + kh * q.dh;
      const bool in = ih >= 0 && ih < q.H;
      full = full && in;
      xr[kh] = in ? x + ((n * q.H + ih) * q.W) * C + c0 : nullptr;
    }
    const int64_t o = ((n * q.OH + oh) * q.OW) * C + c0;
    float* yr = out.y + o;
    float* zr = out.z ? out.z + o : nullptr;
    const int64_t lo = full ? ow_lo : q.OW, hi = full ? ow_hi : q.OW;
    int64_t ow = 0;
    for (; ow < lo; ++ow) checked<A, K>(xr, w, b, q, ow, yr, zr, stp, alpha);
    if (unit) {
      // stride 1, dilation 1 along the row: the kTile + K - 1 input vectors of a tap row are
      // loaded once and shared by all taps and pixels (a load per tap and pixel, each through
      // its own pointer, ran out of registers: GCC spilled the pointers and accumulators)
      for (; ow + kTile <= hi; ow += kTile) {
        v16 acc[kTile];
        for (int p = 0; p < kTile; ++p) acc[p] = b;
        const int64_t i0 = (ow - q.pw) * C;
#pragma GCC unroll 5
        for (int kh = 0; kh < K; ++kh) {
          const float* r = xr[kh] + i0;
          v16 xv[kTile + K - 1];
#pragma GCC unroll 8
          for (int j = 0; j < kTile + K - 1; ++j) xv[j] = ld(r + j * C);
#pragma GCC unroll 5
          for (int kw = 0; kw < K; ++kw) {
            const v16 wt = w[kh * K + kw];
#pragma GCC unroll 4
            for (int p = 0; p < kTile; ++p) acc[p] += wt * xv[p + kw];
          }
        }
        finish<A, kTile>(acc, yr + ow * C, zr ? zr + ow * C : nullptr, C, stp, alpha);
      }
    }
    for (; ow + kTile <= hi; ow += kTile) {
      v16 acc[kTile];
      for (int p = 0; p < kTile; ++p) acc[p] = b;
      const int64_t i0 = (ow * q.sw - q.pw) * C;
#pragma GCC unroll 5
      for (int kh = 0; kh < K; ++kh) {
#pragma GCC unroll 5
        for (int kw = 0; kw < K; ++kw) {
          const v16 wt = w[kh * K + kw];
          const float* base = xr[kh] + i0 + kw * dC;
#pragma GCC unroll 4
          for (int p = 0; p < kTile; ++p) acc[p] += wt * ld(base + p * sC);
        }
      }
      finish<A, kTile>(acc, yr + ow * C, zr ? zr + ow * C : nullptr, C, stp, alpha);
    }
    for (; ow < q.OW; ++ow) checked<A, K>(xr, w, b, q, ow, yr, zr, stp, alpha);
  }
  if (out.st)
    for (int i = 0; i < 3 * kLanes; ++i) out.st[i] = st[i];
}

// First output column whose taps all lie at column >= 0, and one past the last whose taps all
// lie at column < W (clamped to [0, OW], lo <= hi).
void interior_columns(const Geometry& q, int64_t& lo, int64_t& hi) {
  auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); };
  lo = std::clamp<int64_t>(ceil_div(q.pw, q.sw), 0, q.OW);
  // ow*sw - pw + (KW-1)*dw <= W-1  <=>  ow <= (W - 1 + pw - (KW-1)*dw) / sw
  const int64_t last = q.W - 1 + q.pw - (q.KW - 1) * q.dw;
  hi = last < 0 ? 0 : std::min<int64_t>(q.OW, last / q.sw + 1);
  hi = std::max(hi, lo);
}

template <int A, int K>
void run(const float* x, const float* w, const float* b, float* y, float* z, double* stats, const Geometry& q,
         float alpha) {
  const int64_t blocks = q.C / kLanes;
  // Bands of output rows give small batches enough tasks for every thread (>= 4 per thread).
  const int64_t threads = omp_get_max_threads();
  const int64_t bands = std::clamp<int64_t>((4 * threads + q.N * blocks - 1) / (q.N * blocks), 1, q.OH);
  const int64_t band_rows = (q.OH + bands - 1) / bands;
  const int64_t tasks = q.N * blocks * bands;
  // weights and bias by block: [block][tap][lane], [block][lane]
  std::vector<float> wv(blocks * K * K * kLanes), bv(blocks * kLanes, 0.f);
  for (int64_t c = 0; c < q.C; ++c) {
    for (int t = 0; t < K * K; ++t) wv[((c / kLanes) * K * K + t) * kLanes + c % kLanes] = w[c * K * K + t];
    if (b) bv[c] = b[c];
  }
  int64_t ow_lo, ow_hi;
  interior_columns(q, ow_lo, ow_hi);
  std::vector<double> parts(stats ? tasks * 3 * kLanes : 0, 0.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t k = 0; k < tasks; ++k) {
    const int64_t band = k % bands, nb = k / bands, n = nb / blocks, blk = nb % blocks;
    const int64_t oh0 = band * band_rows, oh1 = std::min(q.OH, oh0 + band_rows);
    if (oh0 >= oh1) continue;
    const Out out{y, z, stats ? parts.data() + k * 3 * kLanes : nullptr};
    rows<A, K>(x, wv.data() + blk * K * K * kLanes, bv.data() + blk * kLanes, out, q, n, blk * kLanes, oh0, oh1,
               ow_lo, ow_hi, alpha);
  }
  if (stats) {
    // fixed order over tasks: the sums do not depend on the thread schedule
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t c0 = ((k / bands) % blocks) * kLanes;
      const double* p = parts.data() + k * 3 * kLanes;
      for (int l = 0; l < kLanes; ++l)
        for (int s = 0; s < 3; ++s) stats[3 * (c0 + l) + s] += p[s * kLanes + l];
    }
  }
}

template <int K>
void by_act(int code, const float* x, const float* w, const float* b, float* y, float* z, double* stats,
            const Geometry& q, float alpha) {
  act::dispatch(code, "dw_conv_act_forward", [&](auto a) {
    run<decltype(a)::value, K>(x, w, b, y, z, stats, q, alpha);
  });
}

}  // namespace

void dw_conv_act_forward(const void* x, const void* w, const void* bias, void* y, void* z, double* stats,
                         DType dtype, const int64_t* geometry, int act_code, double alpha) {
  if (dtype != DType::kFloat32)
    throw std::invalid_argument(std::string("dw_conv_act_forward: float32 only, got ") + dtype_name(dtype));
  const Geometry q = dw::geometry(geometry, "dw_conv_act_forward", true);
  const auto* xx = static_cast<const float*>(x);
  const auto* ww = static_cast<const float*>(w);
  const auto* bb = static_cast<const float*>(bias);
  auto* yy = static_cast<float*>(y);
  auto* zz = static_cast<float*>(z);
  if (q.KH == 3) return by_act<3>(act_code, xx, ww, bb, yy, zz, stats, q, (float)alpha);
  return by_act<5>(act_code, xx, ww, bb, yy, zz, stats, q, (float)alpha);
}

}  // namespace hierfast::cpu
