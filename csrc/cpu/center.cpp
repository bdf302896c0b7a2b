// CPU column-centring of a feature batch: column means in float64, then one fused
// cast + subtract + write. Replaces torch's x.to(f32) / mean(dtype=f64) / sub chain
// (three sweeps and two temporaries) for the Grams of the CKA path.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

template <DType DIn, typename TOut>
void center_impl(const typename Load<DIn>::T* x, int64_t n, int64_t d, int64_t s0, int64_t s1,
                 TOut* out, double* mean) {
  using L = Load<DIn>;
  // Column sums: each thread owns a block of columns and walks the rows, so the
  // inner loop is contiguous when s1 == 1 and no reduction across threads is needed.
  const int64_t block = 256;
  const int64_t nblocks = (d + block - 1) / block;
#pragma omp parallel
  {
    std::vector<double> acc(block);
#pragma omp for schedule(static)
    for (int64_t cb = 0; cb < nblocks; ++cb) {
      const int64_t c0 = cb * block, c1 = std::min(d, c0 + block), w = c1 - c0;
      std::fill(acc.begin(), acc.begin() + w, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const typename L::T* row = x + i * s0 + c0 * s1;
        if (s1 == 1) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) acc[j] += L::get(row + j);
        } else {
          for (int64_t j = 0; j < w; ++j) acc[j] += L::get(row + j * s1);
        }
      }
      for (int64_t j = 0; j < w; ++j) mean[c0 + j] = acc[j] / (double)n;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const typename L::T* row = x + i * s0;
    TOut* orow = out + i * d;
    if (s1 == 1) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) orow[j] = (TOut)(L::get(row + j) - mean[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) orow[j] = (TOut)(L::get(row + j * s1) - mean[j]);
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
