// Runs csrc/cuda/conv_act.cu's launchers under the host emulation (cuda_emu.h) against a plain
// loop over the same act.h functions: every element of y, z, grad_z, the statistics and the bias
// gradient, for NCHW and NHWC, with and without bias, in place and not, small and odd shapes,
// grids of one block to a few per row range (so blocks stride). Built and run by
// tests/test_cuda_emulation.py; prints "failures: 0" on success.
#include "harness.h"
#include "hierfast/act.h"
#include "hierfast/cuda_kernels.h"  // the launchers: csrc/cuda/conv_act.cu, built under the emulation

#include <cmath>
#include <cstdio>
#include <random>

using namespace hierfast;

template <typename T>
bool same(T a, T b) { return a == b || (std::isnan((double)a) && std::isnan((double)b)); }

template <typename T>
void run_case(int64_t N, int64_t C, int64_t HW, bool nhwc, bool with_bias, bool separate, int code, DType dt) {
  const int64_t total = N * C * HW;
  std::mt19937 rng(unsigned(N * 7919 + C * 31 + HW * 3 + nhwc));
  std::normal_distribution<double> normal;
  std::vector<T> z(total), z0, y(total, (T)NAN), b(C), g(total), gz(total, (T)NAN);
  for (auto& v : z) v = (T)normal(rng);
  for (auto& v : b) v = (T)normal(rng);
  for (auto& v : g) v = (T)normal(rng);
  z0 = z;
  const T alpha = (T)0.2;
  std::vector<double> stats(3 * C, 0.25), gbias(C, 0.0), ref_stats(3 * C, 0.25), ref_gbias(C, 0.0);
  T* out = separate ? y.data() : z.data();
  std::string err = cuda::conv_act_forward(z.data(), out, dt, N, C, HW, nhwc, with_bias ? b.data() : nullptr, code,
                                           (double)alpha, stats.data(), 0);
  CHECK(err.empty(), "forward: %s", err.c_str());
  auto channel = [&](int64_t i) { return nhwc ? i % C : (i / HW) % C; };
  const char* layout = nhwc ? "nhwc" : "nchw";
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c = channel(i);
    const T pre = with_bias ? T(z0[i] + b[c]) : z0[i];
    const T want = act::forward<T>(code, pre, alpha);
    CHECK(same(out[i], want), "y[%ld] %g, want %g (N %ld C %ld HW %ld %s code %d)", (long)i, (double)out[i],
          (double)want, (long)N, (long)C, (long)HW, layout, code);
    if (separate) CHECK(same(z[i], pre), "z[%ld] %g, want the pre-activation %g", (long)i, (double)z[i], (double)pre);
    const double o = (double)want;
    ref_stats[3 * c] += o;
    ref_stats[3 * c + 1] += o * o;
    ref_stats[3 * c + 2] += o > 0.0 ? 1.0 : 0.0;
  }
  for (int64_t k = 0; k < 3 * C; ++k)
    CHECK(std::fabs(stats[k] - ref_stats[k]) <= 1e-9 * std::fmax(1.0, std::fabs(ref_stats[k])),
          "stats[%ld] %g, want %g (N %ld C %ld HW %ld %s)", (long)k, stats[k], ref_stats[k], (long)N, (long)C, (long)HW,
          layout);
  err = cuda::conv_act_backward(g.data(), out, gz.data(), dt, N, C, HW, nhwc, code, (double)alpha, gbias.data(), 0);
  CHECK(err.empty(), "backward: %s", err.c_str());
  for (int64_t i = 0; i < total; ++i) {
    const T want = g[i] * act::derivative<T>(code, out[i], alpha);
    CHECK(same(gz[i], want), "grad_z[%ld] %g, want %g", (long)i, (double)gz[i], (double)want);
    ref_gbias[channel(i)] += (double)want;
  }
  for (int64_t c = 0; c < C; ++c)
    CHECK(std::fabs(gbias[c] - ref_gbias[c]) <= 1e-9 * std::fmax(1.0, std::fabs(ref_gbias[c])),
          "grad_bias[%ld] %g, want %g (N %ld C %ld HW %ld %s)", (long)c, gbias[c], ref_gbias[c], (long)N, (long)C,
          (long)HW, layout);
  // without the sums (null statistics and bias-gradient pointers)
  std::vector<T> y2(total, (T)NAN), gz2(total, (T)NAN);
  err = cuda::conv_act_forward(z0.data(), y2.data(), dt, N, C, HW, nhwc, nullptr, code, (double)alpha, nullptr, 0);
  err += cuda::conv_act_backward(g.data(), y2.data(), gz2.data(), dt, N, C, HW, nhwc, code, (double)alpha, nullptr, 0);
  CHECK(err.empty(), "without sums: %s", err.c_str());
  for (int64_t i = 0; i < total; ++i) {
    CHECK(same(y2[i], act::forward<T>(code, z0[i], alpha)), "y (no sums)[%ld]", (long)i);
    CHECK(same(gz2[i], T(g[i] * act::derivative<T>(code, y2[i], alpha))), "grad_z (no sums)[%ld]", (long)i);
  }
}

int main() {
  // (N, C, HW): one element; C below, at and past the 32-lane NHWC tile; one pixel; many rows
  // (NCHW launches one block per channel at least: channel counts are kept small, so that the
  // emulation, a few milliseconds a block, stays quick)
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 28}, {2, 37, 45}, {1, 32, 49}, {2, 3, 150}, {2, 40, 1}};
  int k = 0;
  for (int blocks_per_sm : {1, 3}) {
    emu_blocks_per_sm = blocks_per_sm;
    for (const auto& s : shapes)
      for (int nhwc = 0; nhwc < 2; ++nhwc)
        for (int bias = 0; bias < 2; ++bias)
          for (int separate = 0; separate < 2; ++separate, ++k) {
            run_case<float>(s[0], s[1], s[2], nhwc, bias, separate, 1 + k % 10, DType::kFloat32);
            if (k % 2) run_case<double>(s[0], s[1], s[2], nhwc, bias, separate, 10 - k % 11, DType::kFloat64);
          }
  }
  return report();
}
