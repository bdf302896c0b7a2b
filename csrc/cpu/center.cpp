// CPU column-centring of a feature batch: column means in float64, then one fused
// cast + subtract + write. Replaces torch's x.to(f32) / mean(dtype=f64) / sub chain
// (three sweeps and two temporaries) for the Grams of the CKA path. A NaN or inf in
// a column makes its mean non-finite, which is how callers detect bad input without
// a separate isfinite pass.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

constexpr int64_t kBlock = 512;  // columns per task: acc fits in L1 (4 KiB)

// acc[0:w] += sum over rows of x[r, c0:c0+w] (contiguous columns).
template <DType DIn>
HIERFAST_SIMD_CLONES void colsum_block(const typename Load<DIn>::T* __restrict__ x, int64_t n,
                                       int64_t s0, int64_t w, double* __restrict__ acc) {
  for (int64_t i = 0; i < n; ++i) {
    const typename Load<DIn>::T* __restrict__ row = x + i * s0;
    for (int64_t j = 0; j < w; ++j) acc[j] += Load<DIn>::get(row + j);
  }
}

template <DType DIn, typename TOut>
HIERFAST_SIMD_CLONES void sub_row(const typename Load<DIn>::T* __restrict__ row, int64_t d,
                                  const double* __restrict__ mean, TOut* __restrict__ out) {
  for (int64_t j = 0; j < d; ++j) out[j] = (TOut)(Load<DIn>::get(row + j) - mean[j]);
}

template <DType DIn, typename TOut>
void center_impl(const typename Load<DIn>::T* x, int64_t n, int64_t d, int64_t s0, int64_t s1,
                 TOut* out, double* mean) {
  using L = Load<DIn>;
  const int64_t nblocks = (d + kBlock - 1) / kBlock;
  // Column sums: each task owns a block of columns and walks all rows, so no
  // cross-thread reduction is needed and the result does not depend on threads.
#pragma omp parallel
  {
    std::vector<double> acc(kBlock);
#pragma omp for schedule(static)
    for (int64_t cb = 0; cb < nblocks; ++cb) {
      const int64_t c0 = cb * kBlock, w = std::min(d, c0 + kBlock) - c0;
      std::fill(acc.begin(), acc.begin() + w, 0.0);
      if (s1 == 1) {
        colsum_block<DIn>(x + c0, n, s0, w, acc.data());
      } else {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < w; ++j) acc[j] += L::get(x + i * s0 + (c0 + j) * s1);
      }
      for (int64_t j = 0; j < w; ++j) mean[c0 + j] = acc[j] / (double)n;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (s1 == 1) {
      sub_row<DIn, TOut>(x + i * s0, d, mean, out + i * d);
    } else {
      for (int64_t j = 0; j < d; ++j) out[i * d + j] = (TOut)(L::get(x + i * s0 + j * s1) - mean[j]);
    }
  }
}

template <DType DIn>
void dispatch_out(const void* x, int64_t n, int64_t d, int64_t s0, int64_t s1, void* out,
                  DType out_dtype, double* mean) {
  auto px = static_cast<const typename Load<DIn>::T*>(x);
  switch (out_dtype) {
    case DType::kFloat32:
      return center_impl<DIn>(px, n, d, s0, s1, static_cast<float*>(out), mean);
    case DType::kFloat64:
      return center_impl<DIn>(px, n, d, s0, s1, static_cast<double*>(out), mean);
    default:
      throw std::invalid_argument(std::string("center_columns: unsupported output dtype ") +
                                  dtype_name(out_dtype));
  }
}

}  // namespace

void center_columns(const void* x, DType in_dtype, int64_t n, int64_t d, int64_t s0, int64_t s1,
                    void* out, DType out_dtype, double* mean) {
  if (n < 1 || d < 1) throw std::invalid_argument("center_columns: empty input");
  switch (in_dtype) {
    case DType::kFloat16: return dispatch_out<DType::kFloat16>(x, n, d, s0, s1, out, out_dtype, mean);
    case DType::kBFloat16: return dispatch_out<DType::kBFloat16>(x, n, d, s0, s1, out, out_dtype, mean);
    case DType::kFloat32: return dispatch_out<DType::kFloat32>(x, n, d, s0, s1, out, out_dtype, mean);
    case DType::kFloat64: return dispatch_out<DType::kFloat64>(x, n, d, s0, s1, out, out_dtype, mean);
  }
  throw std::invalid_argument("center_columns: unknown dtype");
}

}  // namespace hierfast::cpu
