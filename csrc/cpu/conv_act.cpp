// CPU conv epilogue: bias + activation over a convolution's output in ONE pass,
// in place (y == z) or writing y while keeping the pre-activation z (training with
// a smooth activation), optionally accumulating per-channel statistics of y; and
// the backward pass through the activation fused with the bias-gradient reduction.
// Layouts: NCHW-contiguous (one channel per HW plane) or NHWC (channels_last: C
// contiguous per pixel). Activation math: csrc/include/hierfast/act.h.
// The activation loops contain selects over both computed branches; GCC if-converts
// (and so vectorises) them only when FP operations are assumed not to trap.
#pragma GCC optimize("no-trapping-math")
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "hierfast/act.h"
#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

// Storage <-> compute conversions (float for half types, else the type itself).
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // overflow -> inf
  if (ax < 0x38800000u) {                                    // subnormal or zero
    float a;
    std::memcpy(&a, &ax, 4);
    return (uint16_t)(sign | (uint32_t)std::nearbyint(a * 16777216.0f));
  }
  uint32_t r = ax + 0xC8000FFFu + ((ax >> 13) & 1u);  // rebias exponent, round to nearest even
  return (uint16_t)(sign | (r >> 13));
}

template <DType D> struct IO;
template <> struct IO<DType::kFloat32> {
  using S = float; using C = float;
  static inline C ld(S v) { return v; }
  static inline S st(C v) { return v; }
};
template <> struct IO<DType::kFloat64> {
  using S = double; using C = double;
  static inline C ld(S v) { return v; }
  static inline S st(C v) { return v; }
};
template <> struct IO<DType::kBFloat16> {
  using S = uint16_t; using C = float;
  static inline C ld(S v) { return bf16_bits_to_float(v); }
  static inline S st(C v) { return float_to_bf16(v); }
};
template <> struct IO<DType::kFloat16> {
  using S = uint16_t; using C = float;
  static inline C ld(S v) { return half_bits_to_float(v); }
  static inline S st(C v) { return float_to_half(v); }
};

// One contiguous run of `len` elements with a constant bias `bc` (an NCHW plane, or
// bias-free NHWC rows) or a per-element bias vector `bv` (one NHWC row, len = C).
// In place (z == y) and out of place are separate loops so neither aliases; the
// activation code is a template parameter so each body vectorises.
template <DType D, int A>
HIERFAST_SIMD_CLONES void fwd_inplace(typename IO<D>::S* __restrict__ y, int64_t len,
                                      typename IO<D>::C bc, const typename IO<D>::S* __restrict__ bv,
                                      typename IO<D>::C alpha) {
  using C = typename IO<D>::C;
  if (bv) {
    for (int64_t i = 0; i < len; ++i)
      y[i] = IO<D>::st(act::forward<C>(A, IO<D>::ld(y[i]) + IO<D>::ld(bv[i]), alpha));
  } else {
    for (int64_t i = 0; i < len; ++i) y[i] = IO<D>::st(act::forward<C>(A, IO<D>::ld(y[i]) + bc, alpha));
  }
}

template <DType D, int A>
HIERFAST_SIMD_CLONES void fwd_keep(typename IO<D>::S* __restrict__ z, typename IO<D>::S* __restrict__ y,
                                   int64_t len, typename IO<D>::C bc,
                                   const typename IO<D>::S* __restrict__ bv, typename IO<D>::C alpha) {
  using C = typename IO<D>::C;
  // Two loops, not `bv ? bv[i] : bc` in one: GCC if-converts that select into an AVX-512
  // masked load from bv, and with bv == nullptr every masked-off load of the null page takes
  // a fault-suppression microcode assist (measured: GELU out of place 14 ms instead of 1 ms
  // on 3.6 M floats, AMD Zen 5).
  if (bv) {
    for (int64_t i = 0; i < len; ++i) {
      C v = IO<D>::ld(z[i]) + IO<D>::ld(bv[i]);
      z[i] = IO<D>::st(v);
      y[i] = IO<D>::st(act::forward<C>(A, v, alpha));
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      C v = IO<D>::ld(z[i]) + bc;
      z[i] = IO<D>::st(v);
      y[i] = IO<D>::st(act::forward<C>(A, v, alpha));
    }
  }
}

template <DType D, int A>
inline void fwd_run(typename IO<D>::S* z, typename IO<D>::S* y, int64_t len, typename IO<D>::C bc,
                    const typename IO<D>::S* bv, typename IO<D>::C alpha) {
  if (z == y) fwd_inplace<D, A>(y, len, bc, bv, alpha);
  else fwd_keep<D, A>(z, y, len, bc, bv, alpha);
}

template <DType D, int A>
HIERFAST_SIMD_CLONES void bwd_run(const typename IO<D>::S* __restrict__ g,
                                  const typename IO<D>::S* __restrict__ s,
                                  typename IO<D>::S* __restrict__ gz, int64_t len,
                                  typename IO<D>::C alpha) {
  using C = typename IO<D>::C;
  for (int64_t i = 0; i < len; ++i)
    gz[i] = IO<D>::st(IO<D>::ld(g[i]) * act::derivative<C>(A, IO<D>::ld(s[i]), alpha));
}

// Backward with the bias gradient in the same pass. NHWC rows: acc[c] += grad_z (an
// elementwise update across c, so it vectorises). NCHW plane: 16 lane partial sums
// (a plain scalar reduction would not vectorise without reassociation).
template <DType D, int A>
HIERFAST_SIMD_CLONES void bwd_rows_bias(const typename IO<D>::S* __restrict__ g,
                                        const typename IO<D>::S* __restrict__ s,
                                        typename IO<D>::S* __restrict__ gz, int64_t rows, int64_t C,
                                        typename IO<D>::C alpha, typename IO<D>::C* __restrict__ acc) {
  using Cc = typename IO<D>::C;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * C;
    for (int64_t i = 0; i < C; ++i) {
      Cc v = IO<D>::ld(g[o + i]) * act::derivative<Cc>(A, IO<D>::ld(s[o + i]), alpha);
      gz[o + i] = IO<D>::st(v);
      acc[i] += v;
    }
  }
}

template <DType D, int A>
HIERFAST_SIMD_CLONES double bwd_plane_bias(const typename IO<D>::S* __restrict__ g,
                                           const typename IO<D>::S* __restrict__ s,
                                           typename IO<D>::S* __restrict__ gz, int64_t len,
                                           typename IO<D>::C alpha) {
  using Cc = typename IO<D>::C;
  constexpr int L = 16;
  Cc lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= len; i += L)
    for (int j = 0; j < L; ++j) {
      Cc v = IO<D>::ld(g[i + j]) * act::derivative<Cc>(A, IO<D>::ld(s[i + j]), alpha);
      gz[i + j] = IO<D>::st(v);
      lanes[j] += v;
    }
  double tot = 0.0;
  for (; i < len; ++i) {
    Cc v = IO<D>::ld(g[i]) * act::derivative<Cc>(A, IO<D>::ld(s[i]), alpha);
    gz[i] = IO<D>::st(v);
    tot += (double)v;
  }
  for (int j = 0; j < L; ++j) tot += (double)lanes[j];
  return tot;
}

// Per-channel statistics of y, accumulated in float64 (sums of squares of post-ReLU
// features with a large mean lose too much in float32 before the variance subtracts).
// Both loops are written so GCC vectorises them: NHWC rows update three separate
// channel arrays elementwise (contiguous, across c); an NCHW plane keeps 8 lane partials
// per sum (a plain scalar reduction would not vectorise without reassociation).
template <DType D>
HIERFAST_SIMD_CLONES void stats_row(const typename IO<D>::S* __restrict__ y, int64_t C,
                                    double* __restrict__ sum, double* __restrict__ sq,
                                    double* __restrict__ pos) {
  for (int64_t i = 0; i < C; ++i) {
    const double v = IO<D>::ld(y[i]);
    sum[i] += v;
    sq[i] += v * v;
    pos[i] += v > 0.0 ? 1.0 : 0.0;
  }
}

template <DType D>
HIERFAST_SIMD_CLONES void stats_plane(const typename IO<D>::S* __restrict__ y, int64_t len, double* acc) {
  constexpr int L = 8;
  double s[L] = {}, q[L] = {}, a[L] = {};
  int64_t i = 0;
  for (; i + L <= len; i += L)
    for (int j = 0; j < L; ++j) {
      const double v = IO<D>::ld(y[i + j]);
      s[j] += v;
      q[j] += v * v;
      a[j] += v > 0.0 ? 1.0 : 0.0;
    }
  for (; i < len; ++i) {
    const double v = IO<D>::ld(y[i]);
    s[0] += v;
    q[0] += v * v;
    a[0] += v > 0.0 ? 1.0 : 0.0;
  }
  for (int j = 0; j < L; ++j) {
    acc[0] += s[j];
    acc[1] += q[j];
    acc[2] += a[j];
  }
}

// Per-thread float64 partial sums of an NHWC pass, one slot of `width` values per thread of
// the team, added in thread order after the parallel region: bit-identical results for a
// fixed thread count (a critical section added them in arrival order, which varied).
class ThreadPartials {
 public:
  ThreadPartials(int64_t width, bool par)
      : width_((width + kLine - 1) / kLine * kLine),  // a slot stride of whole 64-byte lines
        slots_(par ? omp_get_max_threads() : 1),
        buf_((size_t)slots_ * width_ + kLine, 0.0),
        data_(line_aligned(buf_.data())) {}
  ThreadPartials(const ThreadPartials&) = delete;  // data_ points into buf_
  ThreadPartials& operator=(const ThreadPartials&) = delete;
  double* mine() { return data_ + (size_t)omp_get_thread_num() * width_; }
  double sum(int64_t i) const {  // slot order, whatever order the threads finished in
    double s = 0.0;
    for (int t = 0; t < slots_; ++t) s += data_[(size_t)t * width_ + i];
    return s;
  }

 private:
  static constexpr int64_t kLine = 64 / sizeof(double);  // doubles per cache line
  // std::vector only guarantees 16-byte alignment: the slots start at the first line
  // boundary in buf_ (kLine spare doubles), so with the line-multiple stride no two threads'
  // slots share a cache line (false sharing made small NHWC stats passes 2.5x slower).
  static double* line_aligned(double* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<double*>((a + 63) & ~(uintptr_t)63);
  }
  int64_t width_;
  int slots_;
  std::vector<double> buf_;
  double* data_;
};

// NHWC statistics partials ([0, C) sums, [C, 2C) squares, [2C, 3C) positive counts) into the
// (C x 3) statistics.
inline void add_channel_sums(double* stats, const ThreadPartials& acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 3; ++k) stats[3 * c + k] += acc.sum(k * C + c);
}

// Below this many elements a pass runs on one thread: starting an OpenMP team costs ~2 us
// (2-core Zen 5, 2 threads: 2.3 us for a 256-element epilogue, most of a tiny layer's
// kernel time), more than splitting a pass this short saves. torch's own elementwise
// kernels use the same grain (at::internal::GRAIN_SIZE).
constexpr int64_t kParallelGrain = 32768;
inline bool parallel_pays(int64_t N, int64_t C, int64_t HW) { return N * C * HW >= kParallelGrain; }

// Rows of NHWC are short (C elements); group rows so that each task is >= ~4k elements.
inline int64_t rows_per_task(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

template <DType D, int A>
void forward_impl(void* zv, void* yv, int64_t N, int64_t C, int64_t HW, bool nhwc,
                  const void* bv, double alpha_d, double* stats) {
  using S = typename IO<D>::S;
  using Cc = typename IO<D>::C;
  S* z = static_cast<S*>(zv);
  S* y = static_cast<S*>(yv);
  const S* b = static_cast<const S*>(bv);
  const Cc alpha = (Cc)alpha_d;
  const bool par = parallel_pays(N, C, HW);
  if (!nhwc) {
    auto plane = [&](int64_t c, int64_t n) {
      const int64_t off = (n * C + c) * HW;
      fwd_run<D, A>(z + off, y + off, HW, b ? IO<D>::ld(b[c]) : (Cc)0, nullptr, alpha);
      if (stats) stats_plane<D>(y + off, HW, stats + 3 * c);
    };
    if (stats) {
      // parallel over channels, batch inside: each channel's statistics have one owner
#pragma omp parallel for schedule(static) if (par)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t n = 0; n < N; ++n) plane(c, n);
    } else {
#pragma omp parallel for schedule(static) collapse(2) if (par)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t n = 0; n < N; ++n) plane(c, n);
    }
    return;
  }
  const int64_t rows = N * HW, step = rows_per_task(C);
  // per thread: sums, sums of squares and positive counts, [0, C), [C, 2C), [2C, 3C)
  ThreadPartials parts(stats ? 3 * C : 0, par);
#pragma omp parallel if (par)
  {
    double* acc = parts.mine();
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t r1 = std::min(rows, r0 + step);
      if (b) {
        for (int64_t r = r0; r < r1; ++r) fwd_run<D, A>(z + r * C, y + r * C, C, (Cc)0, b, alpha);
      } else {  // no bias: the rows are one contiguous run
        fwd_run<D, A>(z + r0 * C, y + r0 * C, (r1 - r0) * C, (Cc)0, nullptr, alpha);
      }
      if (stats)
        for (int64_t r = r0; r < r1; ++r) stats_row<D>(y + r * C, C, acc, acc + C, acc + 2 * C);
    }
  }
  if (stats) add_channel_sums(stats, parts, C);
}

// Statistics of an existing y, read only (y from oneDNN's fused convolution: one read
// instead of our epilogue's read + write); parallel as forward_impl with statistics.
template <DType D>
void stats_impl(const void* yv, int64_t N, int64_t C, int64_t HW, bool nhwc, double* stats) {
  using S = typename IO<D>::S;
  const S* y = static_cast<const S*>(yv);
  const bool par = parallel_pays(N, C, HW);
  if (!nhwc) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t n = 0; n < N; ++n) stats_plane<D>(y + (n * C + c) * HW, HW, stats + 3 * c);
    return;
  }
  const int64_t rows = N * HW, step = rows_per_task(C);
  ThreadPartials parts(3 * C, par);
#pragma omp parallel if (par)
  {
    double* acc = parts.mine();
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t r1 = std::min(rows, r0 + step);
      for (int64_t r = r0; r < r1; ++r) stats_row<D>(y + r * C, C, acc, acc + C, acc + 2 * C);
    }
  }
  add_channel_sums(stats, parts, C);
}

template <DType D, int A>
void backward_impl(const void* gv, const void* sv, void* gzv, int64_t N, int64_t C, int64_t HW,
                   bool nhwc, double alpha_d, double* gbias) {
  using S = typename IO<D>::S;
  const S* g = static_cast<const S*>(gv);
  const S* s = static_cast<const S*>(sv);
  S* gz = static_cast<S*>(gzv);
  const auto alpha = (typename IO<D>::C)alpha_d;
  const bool par = parallel_pays(N, C, HW);
  if (!nhwc) {
    if (gbias) {
      // parallel over channels, batch inside: each channel's bias sum has one owner
#pragma omp parallel for schedule(static) if (par)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * HW;
          gbias[c] += bwd_plane_bias<D, A>(g + off, s + off, gz + off, HW, alpha);
        }
    } else {
#pragma omp parallel for schedule(static) collapse(2) if (par)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * HW;
          bwd_run<D, A>(g + off, s + off, gz + off, HW, alpha);
        }
    }
    return;
  }
  const int64_t rows = N * HW, step = rows_per_task(C);
  ThreadPartials parts(gbias ? C : 0, par);
#pragma omp parallel if (par)
  {
    double* acc = parts.mine();
    // per-task partial sums in the compute type (<= `step` rows), then float64
    std::vector<typename IO<D>::C> part(gbias ? C : 0);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t r1 = std::min(rows, r0 + step);
      if (gbias) {
        std::fill(part.begin(), part.end(), (typename IO<D>::C)0);
        bwd_rows_bias<D, A>(g + r0 * C, s + r0 * C, gz + r0 * C, r1 - r0, C, alpha, part.data());
        for (int64_t i = 0; i < C; ++i) acc[i] += (double)part[i];
      } else {
        bwd_run<D, A>(g + r0 * C, s + r0 * C, gz + r0 * C, (r1 - r0) * C, alpha);
      }
    }
  }
  if (gbias)
    for (int64_t i = 0; i < C; ++i) gbias[i] += parts.sum(i);
}

// Runtime activation code -> template instance.
template <DType D, template <DType, int> class F, typename... Args>
void by_act(int code, Args... args) {
  act::dispatch(code, "conv_act", [&](auto a) { F<D, decltype(a)::value>::run(args...); });
}
template <DType D, int A> struct Fwd {
  template <typename... Args> static void run(Args... a) { forward_impl<D, A>(a...); }
};
template <DType D, int A> struct Bwd {
  template <typename... Args> static void run(Args... a) { backward_impl<D, A>(a...); }
};

}  // namespace

void conv_act_forward(void* z, void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc,
                      const void* bias, int act_code, double alpha, double* stats) {
  switch (dtype) {
    case DType::kFloat16: return by_act<DType::kFloat16, Fwd>(act_code, z, y, N, C, HW, nhwc, bias, alpha, stats);
    case DType::kBFloat16: return by_act<DType::kBFloat16, Fwd>(act_code, z, y, N, C, HW, nhwc, bias, alpha, stats);
    case DType::kFloat32: return by_act<DType::kFloat32, Fwd>(act_code, z, y, N, C, HW, nhwc, bias, alpha, stats);
    case DType::kFloat64: return by_act<DType::kFloat64, Fwd>(act_code, z, y, N, C, HW, nhwc, bias, alpha, stats);
  }
  throw std::invalid_argument("conv_act_forward: unknown dtype");
}

void conv_act_stats(const void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc, double* stats) {
  switch (dtype) {
    case DType::kFloat16: return stats_impl<DType::kFloat16>(y, N, C, HW, nhwc, stats);
    case DType::kBFloat16: return stats_impl<DType::kBFloat16>(y, N, C, HW, nhwc, stats);
    case DType::kFloat32: return stats_impl<DType::kFloat32>(y, N, C, HW, nhwc, stats);
    case DType::kFloat64: return stats_impl<DType::kFloat64>(y, N, C, HW, nhwc, stats);
  }
  throw std::invalid_argument("conv_act_stats: unknown dtype");
}

void conv_act_backward(const void* grad_y, const void* saved, void* grad_z, DType dtype, int64_t N,
                       int64_t C, int64_t HW, bool nhwc, int act_code, double alpha, double* grad_bias) {
  switch (dtype) {
    case DType::kFloat16: return by_act<DType::kFloat16, Bwd>(act_code, grad_y, saved, grad_z, N, C, HW, nhwc, alpha, grad_bias);
    case DType::kBFloat16: return by_act<DType::kBFloat16, Bwd>(act_code, grad_y, saved, grad_z, N, C, HW, nhwc, alpha, grad_bias);
    case DType::kFloat32: return by_act<DType::kFloat32, Bwd>(act_code, grad_y, saved, grad_z, N, C, HW, nhwc, alpha, grad_bias);
    case DType::kFloat64: return by_act<DType::kFloat64, Bwd>(act_code, grad_y, saved, grad_z, N, C, HW, nhwc, alpha, grad_bias);
  }
  throw std::invalid_argument("conv_act_backward: unknown dtype");
}

}  // namespace hierfast::cpu
