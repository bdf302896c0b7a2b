// Per-channel spatial reduction + running top-k merge (hierfast.visualize.top_activating).
//
// For a batch of activations x (B, C, S) with element strides (sb, sc, ss), each channel
// c reduces every row x[b, c, :] to one score (max with the first argmax, or the mean)
// and merges (score, base + b, argmax) into its running top-k list, kept sorted by
// (score descending, dataset index ascending). Since dataset indices grow along the
// stream, a new entry that ties an old one goes after it; within a row the lowest
// spatial index wins a tie. Rows holding a NaN are not merged; they are counted in
// bad[c] so that Python can raise (nothing silently ranks NaN).
//
// State (all contiguous, owned by the caller): vals (C, k) float64, idx (C, k) int64
// (-1 = empty slot), pos (C, k) int64 (-1 for the mean), bad (C,) int64.
#include <omp.h>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "hierfast/cpu_kernels.h"
#include "hierfast/topk_list.h"

namespace hierfast::cpu {
namespace {

struct RowScore {
  double score;
  int64_t arg;
  bool nan;
};

// Max and first argmax of one row, in two vectorisable sweeps (the row is in cache
// for the second): max ignoring NaN, then the first index equal to it.
template <DType D>
HIERFAST_SIMD_CLONES RowScore row_max(const typename Load<D>::T* __restrict__ row, int64_t S, int64_t ss) {
  double m = -std::numeric_limits<double>::infinity();
  int64_t nan = 0;
  if (ss == 1) {
    for (int64_t s = 0; s < S; ++s) {
      const double a = Load<D>::get(row + s);
      m = a > m ? a : m;
      nan += (a != a);
    }
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const double a = Load<D>::get(row + s * ss);
      m = a > m ? a : m;
      nan += (a != a);
    }
  }
  int64_t arg = 0;
  while (arg < S && !(Load<D>::get(row + arg * ss) == m)) ++arg;
  return {m, arg, nan > 0};
}

template <DType D>
HIERFAST_SIMD_CLONES RowScore row_mean(const typename Load<D>::T* __restrict__ row, int64_t S, int64_t ss) {
  double acc = 0.0;
  for (int64_t s = 0; s < S; ++s) acc += Load<D>::get(row + s * ss);
  return {acc / (double)S, -1, acc != acc};  // NaN input, or +inf + -inf
}

template <DType D>
void impl(const typename Load<D>::T* x, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc,
          int64_t ss, int64_t base, int64_t k, int mode, double* vals, int64_t* idx, int64_t* pos,
          int64_t* bad) {
  // One task per channel: each owns its list, so no locking and the result does not
  // depend on the thread count.
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    double* v = vals + c * k;
    int64_t* id = idx + c * k;
    int64_t* p = pos + c * k;
    for (int64_t b = 0; b < B; ++b) {
      const typename Load<D>::T* row = x + b * sb + c * sc;
      const RowScore r = mode == 0 ? row_max<D>(row, S, ss) : row_mean<D>(row, S, ss);
      if (r.nan) {
        ++bad[c];
        continue;
      }
      topk_insert(v, id, p, k, r.score, base + b, r.arg);
    }
  }
}

}  // namespace

void channel_topk(const void* x, DType dtype, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc,
                  int64_t ss, int64_t base, int64_t k, int mode, double* vals, int64_t* idx, int64_t* pos,
                  int64_t* bad) {
  if (B < 0 || C < 1 || S < 1 || k < 1) throw std::invalid_argument("channel_topk: empty input or k < 1");
  if (mode != 0 && mode != 1) throw std::invalid_argument("channel_topk: mode must be 0 (max) or 1 (mean)");
  switch (dtype) {
    case DType::kFloat16:
      return impl<DType::kFloat16>(static_cast<const uint16_t*>(x), B, C, S, sb, sc, ss, base, k, mode, vals,
                                   idx, pos, bad);
    case DType::kBFloat16:
      return impl<DType::kBFloat16>(static_cast<const uint16_t*>(x), B, C, S, sb, sc, ss, base, k, mode, vals,
                                    idx, pos, bad);
    case DType::kFloat32:
      return impl<DType::kFloat32>(static_cast<const float*>(x), B, C, S, sb, sc, ss, base, k, mode, vals, idx,
                                   pos, bad);
    case DType::kFloat64:
      return impl<DType::kFloat64>(static_cast<const double*>(x), B, C, S, sb, sc, ss, base, k, mode, vals, idx,
                                   pos, bad);
  }
  throw std::invalid_argument("channel_topk: unknown dtype");
}

}  // namespace hierfast::cpu
