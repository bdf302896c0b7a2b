// Runs csrc/cuda's Gram epilogue, column centring, channel top-k and 2-NN screen launchers under
// the host emulation (cuda_emu.h) against the CPU kernels (csrc/cpu, the same definitions) or a
// brute force (the 2-NN screen, which the CPU does not have): random inputs, odd sizes, strided
// views, float32 and float64. Built and run by tests/test_cuda_emulation.py; prints
// "failures: 0" on success.
#include "harness.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "hierfast/cpu_kernels.h"
#include "hierfast/cuda_kernels.h"

using namespace hierfast;
static std::mt19937 rng(1234);

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<double>() { return DType::kFloat64; }
template <typename T> double tol() { return sizeof(T) == 4 ? 1e-5 : 1e-11; }

bool close(double a, double b, double rtol) { return std::fabs(a - b) <= rtol * std::fmax(1.0, std::fabs(b)); }

// Random n x d values in a buffer of n x (d + pad), read with strides (s0, s1): transposed too.
template <typename T>
std::vector<T> matrix(int64_t n, int64_t d, bool transposed, int64_t& s0, int64_t& s1, double offset = 0.0) {
  std::normal_distribution<double> normal;
  const int64_t pad = 3;
  std::vector<T> buf((n + pad) * (d + pad));
  for (auto& v : buf) v = (T)(normal(rng) + offset);
  if (transposed) { s0 = 1; s1 = n + pad; } else { s0 = d + pad; s1 = 1; }
  return buf;
}

template <typename T>
void gram_case(int64_t n, bool unbiased, bool transposed) {
  int64_t s0, s1;
  auto a = matrix<T>(n, n, transposed, s0, s1);
  // symmetrise the n x n view
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) a[j * s0 + i * s1] = a[i * s0 + j * s1];
  std::vector<T> out_gpu(n * n, (T)NAN), out_cpu(n * n, (T)NAN);
  std::vector<double> rs_gpu(n, NAN), rs_cpu(n, NAN), tot_gpu(1, NAN), tot_cpu(1, NAN);
  std::string err = cuda::gram_epilogue(a.data(), dtype_of<T>(), n, s0, s1, out_gpu.data(), dtype_of<T>(),
                                        rs_gpu.data(), tot_gpu.data(), unbiased, 0);
  CHECK(err.empty(), "gram_epilogue: %s", err.c_str());
  cpu::gram_epilogue(a.data(), dtype_of<T>(), n, s0, s1, out_cpu.data(), dtype_of<T>(), rs_cpu.data(), tot_cpu.data(),
                     unbiased);
  CHECK(close(tot_gpu[0], tot_cpu[0], 1e-11), "gram total %g vs %g (n %ld)", tot_gpu[0], tot_cpu[0], (long)n);
  for (int64_t i = 0; i < n; ++i) CHECK(close(rs_gpu[i], rs_cpu[i], 1e-11), "gram rowsum[%ld]", (long)i);
  for (int64_t i = 0; i < n * n; ++i)
    CHECK(close(out_gpu[i], out_cpu[i], tol<T>()), "gram out[%ld] %g vs %g (n %ld unbiased %d)", (long)i,
          (double)out_gpu[i], (double)out_cpu[i], (long)n, unbiased);
}

template <typename T>
void center_case(int64_t n, int64_t d, bool transposed) {
  int64_t s0, s1;
  auto x = matrix<T>(n, d, transposed, s0, s1, 40.0);
  std::vector<T> out_gpu(n * d, (T)NAN), out_cpu(n * d, (T)NAN);
  std::vector<double> m_gpu(d, NAN), m_cpu(d, NAN);
  std::string err = cuda::center_columns(x.data(), dtype_of<T>(), n, d, s0, s1, out_gpu.data(), dtype_of<T>(),
                                         m_gpu.data(), 0);
  CHECK(err.empty(), "center_columns: %s", err.c_str());
  cpu::center_columns(x.data(), dtype_of<T>(), n, d, s0, s1, out_cpu.data(), dtype_of<T>(), m_cpu.data());
  for (int64_t j = 0; j < d; ++j) CHECK(close(m_gpu[j], m_cpu[j], 1e-12), "center mean[%ld]", (long)j);
  for (int64_t i = 0; i < n * d; ++i)
    CHECK(close(out_gpu[i], out_cpu[i], tol<T>()), "center out[%ld] %g vs %g (n %ld d %ld)", (long)i,
          (double)out_gpu[i], (double)out_cpu[i], (long)n, (long)d);
}

template <typename T>
void topk_case(int64_t B, int64_t C, int64_t S, int64_t k, int mode, bool ties = false) {
  std::normal_distribution<double> normal;
  // x: B x C x S with strides (C*S, 1, C) - channels innermost - and one NaN row; ties: values
  // in steps of 0.5, so that maxima tie within rows and across rows (the lower index must win)
  std::vector<T> x(B * C * S);
  for (auto& v : x) v = ties ? (T)(std::round(normal(rng) * 2) / 2) : (T)normal(rng);
  if (B > 1) x[1 * C * S + (S / 2) * C] = (T)NAN;  // one bad row: batch 1, channel 0
  std::vector<double> v_gpu(C * k, -INFINITY), v_cpu(C * k, -INFINITY);
  std::vector<int64_t> i_gpu(C * k, -1), i_cpu(C * k, -1), p_gpu(C * k, -1), p_cpu(C * k, -1), b_gpu(C, 0), b_cpu(C, 0);
  for (int64_t base : {0L, 1000L}) {  // two batches: the merge into lists already filled
    std::string err = cuda::channel_topk(x.data(), dtype_of<T>(), B, C, S, C * S, 1, C, base, k, mode, v_gpu.data(),
                                         i_gpu.data(), p_gpu.data(), b_gpu.data(), 0);
    CHECK(err.empty(), "channel_topk: %s", err.c_str());
    cpu::channel_topk(x.data(), dtype_of<T>(), B, C, S, C * S, 1, C, base, k, mode, v_cpu.data(), i_cpu.data(),
                      p_cpu.data(), b_cpu.data());
  }
  for (int64_t c = 0; c < C; ++c) CHECK(b_gpu[c] == b_cpu[c], "topk bad[%ld] %ld vs %ld", (long)c, (long)b_gpu[c], (long)b_cpu[c]);
  for (int64_t t = 0; t < C * k; ++t) {
    CHECK(i_gpu[t] == i_cpu[t] && p_gpu[t] == p_cpu[t], "topk idx/pos[%ld] %ld/%ld vs %ld/%ld (mode %d)", (long)t,
          (long)i_gpu[t], (long)p_gpu[t], (long)i_cpu[t], (long)p_cpu[t], mode);
    CHECK(close(v_gpu[t], v_cpu[t], 1e-12) || (std::isinf(v_gpu[t]) && v_gpu[t] == v_cpu[t]), "topk vals[%ld]", (long)t);
  }
}

template <typename T>
void knn2_case(int64_t n, int64_t d, bool transposed) {
  int64_t s0, s1;
  auto x = matrix<T>(n, d, transposed, s0, s1);
  std::vector<double> cd(n * 4, NAN);
  std::vector<int64_t> cj(n * 4, -7);
  std::string err = cuda::knn2_screen(x.data(), dtype_of<T>(), n, d, s0, s1, cd.data(), cj.data(), 0);
  CHECK(err.empty(), "knn2_screen: %s", err.c_str());
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i) continue;
      double s = 0;
      for (int64_t f = 0; f < d; ++f) {
        const double diff = (double)x[i * s0 + f * s1] - (double)x[j * s0 + f * s1];
        s += diff * diff;
      }
      all.push_back({s, j});
    }
    std::sort(all.begin(), all.end());
    const int keep = (int)std::min<int64_t>(4, n - 1);
    for (int q = 0; q < keep; ++q) {
      // float32 screens may swap near-equal neighbours: compare the distances, and the indices
      // where the gaps are wide
      CHECK(close(cd[i * 4 + q], all[q].first, sizeof(T) == 4 ? 1e-5 : 1e-12), "knn2 row %ld cand %d: %g vs %g",
            (long)i, q, cd[i * 4 + q], all[q].first);
      const bool wide = (q == 0 || all[q].first - all[q - 1].first > 1e-3) &&
                        (q + 1 >= (int)all.size() || all[q + 1].first - all[q].first > 1e-3);
      if (wide) CHECK(cj[i * 4 + q] == all[q].second, "knn2 row %ld cand %d: index %ld vs %ld", (long)i, q,
                      (long)cj[i * 4 + q], (long)all[q].second);
    }
    for (int q = keep; q < 4; ++q) CHECK(cj[i * 4 + q] == -1 && std::isinf(cd[i * 4 + q]), "knn2 empty slot");
  }
}

int main() {
  for (int blocks_per_sm : {1, 3}) {
    emu_blocks_per_sm = blocks_per_sm;
    for (int64_t n : {4L, 37L}) {
      gram_case<float>(n, false, false);
      gram_case<double>(n, true, true);
    }
    center_case<float>(300, 37, false);
    center_case<double>(70, 5, true);
    center_case<double>(1, 3, false);
    topk_case<float>(5, 3, 300, 4, 0);
    topk_case<double>(7, 2, 50, 3, 1);
    topk_case<float>(2, 1, 1, 2, 0);
    topk_case<float>(9, 3, 200, 5, 0, true);
    topk_case<double>(9, 2, 7, 4, 1, true);
  }
  knn2_case<double>(3, 1, false);
  knn2_case<double>(150, 40, false);
  knn2_case<float>(140, 33, true);
  return report();
}
