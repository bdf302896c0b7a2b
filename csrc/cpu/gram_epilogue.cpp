// CPU Gram epilogue: centring / U-centring of a Gram matrix in two sweeps over its
// n^2 entries (row sums, then one fused write), straight into the caller's output
// row. torch needs ~5 sweeps and 3 temporaries for the same result (sum, two
// broadcast subtractions, fill_diagonal, copy into the stacked matrix).
#include <omp.h>

#include <stdexcept>
#include <vector>

#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

template <typename TIn>
HIERFAST_SIMD_CLONES double row_sum(const TIn* __restrict__ row, int64_t n) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) acc += (double)row[j];
  return acc;
}

template <typename TIn, typename TOut>
HIERFAST_SIMD_CLONES void write_row(const TIn* __restrict__ row, int64_t n, double ri,
                                    const double* __restrict__ b, TOut* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = (TOut)((double)row[j] - ri - b[j]);
}

template <typename TIn, typename TOut>
void epilogue_impl(const TIn* K, int64_t n, int64_t s0, int64_t s1, TOut* out, double* rowsum,
                   double* total, bool unbiased) {
  // Sweep 1: row sums accumulated in float64 (diagonal excluded for U-centring).
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const TIn* row = K + i * s0;
    double acc = 0.0;
    if (s1 == 1) {
      acc = row_sum(row, n);
    } else {
      for (int64_t j = 0; j < n; ++j) acc += (double)row[j * s1];
    }
    if (unbiased) acc -= (double)row[i * s1];
    rowsum[i] = acc;
  }
  double t = 0.0;  // serial: deterministic result independent of thread count
  for (int64_t i = 0; i < n; ++i) t += rowsum[i];
  *total = t;

  // out_ij = K_ij - a r_i - a r_j + c: precompute b_j = a r_j - c so the inner loop
  // is one load, two subtractions and a store.
  const double a = unbiased ? 1.0 / (double)(n - 2) : 1.0 / (double)n;
  const double c = unbiased ? t / ((double)(n - 1) * (double)(n - 2)) : t / ((double)n * (double)n);
  std::vector<double> b(n);
  for (int64_t j = 0; j < n; ++j) b[j] = a * rowsum[j] - c;

  // Sweep 2: fused write.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const TIn* row = K + i * s0;
    TOut* orow = out + i * n;
    const double ri = a * rowsum[i];
    const double* bp = b.data();
    if (s1 == 1) {
      write_row(row, n, ri, bp, orow);
    } else {
      for (int64_t j = 0; j < n; ++j) orow[j] = (TOut)((double)row[j * s1] - ri - bp[j]);
    }
    if (unbiased) orow[i] = (TOut)0;
  }
}

template <typename TIn>
void dispatch_out(const TIn* K, int64_t n, int64_t s0, int64_t s1, void* out, DType out_dtype,
                  double* rowsum, double* total, bool unbiased) {
  switch (out_dtype) {
    case DType::kFloat32:
      return epilogue_impl(K, n, s0, s1, static_cast<float*>(out), rowsum, total, unbiased);
    case DType::kFloat64:
      return epilogue_impl(K, n, s0, s1, static_cast<double*>(out), rowsum, total, unbiased);
    default:
      throw std::invalid_argument(std::string("gram_epilogue: unsupported output dtype ") +
                                  dtype_name(out_dtype));
  }
}

}  // namespace

void gram_epilogue(const void* gram, DType in_dtype, int64_t n, int64_t s0, int64_t s1, void* out,
                   DType out_dtype, double* rowsum, double* total, bool unbiased) {
  if (unbiased && n < 4) throw std::invalid_argument("gram_epilogue: U-centring needs n >= 4");
  if (!unbiased && n < 1) throw std::invalid_argument("gram_epilogue: n must be >= 1");
  switch (in_dtype) {
    case DType::kFloat32:
      return dispatch_out(static_cast<const float*>(gram), n, s0, s1, out, out_dtype, rowsum, total,
                          unbiased);
    case DType::kFloat64:
      return dispatch_out(static_cast<const double*>(gram), n, s0, s1, out, out_dtype, rowsum, total,
                          unbiased);
    default:
      throw std::invalid_argument(std::string("gram_epilogue: unsupported Gram dtype ") +
                                  dtype_name(in_dtype));
  }
}

}  // namespace hierfast::cpu
