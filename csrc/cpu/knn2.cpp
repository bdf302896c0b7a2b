// CPU fused pairwise distance + 2-nearest-neighbour search (definition:
// hierfast/ops/knn2.py::knn2_reference). The n x n distance matrix is never stored.
//
// 1. Screen. The data are centred (distances do not change; the norms, and with them the
//    rounding error of the expansion, shrink), and squared distances ||q||^2 + ||r||^2 - 2 q.r
//    are formed tile by tile from a register-blocked dot-product micro-kernel (kRows query
//    rows x C reference points; references packed transposed so the inner loop is a
//    broadcast-FMA over vector lanes). Each unordered pair is scored once (symmetry) and
//    offered to both of its rows; each row keeps its kKeep smallest offers, ranked by
//    (distance, index). A vectorised threshold test rejects almost every pair before the
//    scalar insertion runs.
// 2. Certify. The kept candidates' squared distances are recomputed exactly in float64 from
//    the original values. A rigorous bound eps_i on the screen's rounding error (see
//    screen_error_bound) proves the two smallest exact values are the true two nearest when
//    the kKeep-th screened value minus eps_i still exceeds the second exact one: every point
//    not kept is then provably farther. Rows that cannot be certified (near ties, exact
//    duplicates in threes) get an exact float64 scan over all points. The result is
//    therefore exact whatever the data's offset, scale or ties.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

constexpr int kKeep = 4;             // screened candidates per row (4: certification ~always succeeds)
constexpr int64_t kRows = 8;         // query rows per micro-tile
constexpr int64_t kQueryBlock = 96;  // query rows sharing one pass over a reference panel (L2)

// Reference points per packed panel: two 512-bit vectors (16 accumulators per micro-tile).
template <typename T> struct Panel { static constexpr int64_t cols = 128 / sizeof(T); };

// acc[r][c] = sum_k q[k][r] * p[k][c] for one packed query micro-tile q (d x kRows) and
// one packed panel p (d x C). Cloned for AVX-512 / AVX2 / baseline (HIERFAST_SIMD_CLONES).
template <typename T>
HIERFAST_SIMD_CLONES void micro_tile(const T* __restrict__ q, const T* __restrict__ p, int64_t d,
                                     T* __restrict__ out) {
  constexpr int64_t C = Panel<T>::cols;
  T acc[kRows][C] = {};
  for (int64_t k = 0; k < d; ++k) {
    const T* pk = p + k * C;
    const T* qk = q + k * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      const T a = qk[r];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[r][c] += a * pk[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = acc[r][c];
}

// Turns a micro-tile of dot products into squared distances (in place) and returns a bit
// per row that has an offer that could enter the row's list (< row_worst[r]) or a column's
// list (<= col_worst[c]; ties are settled by index in the scalar insertion). Pairs with
// j <= i (and rows past the last query) are masked to +inf.
template <typename T>
HIERFAST_SIMD_CLONES unsigned tile_distances(T* __restrict__ tile, const T* __restrict__ ni,
                                             const T* __restrict__ nj, const T* __restrict__ col_worst,
                                             const T* __restrict__ row_worst, int64_t i0, int64_t j0, int64_t n) {
  constexpr int64_t C = Panel<T>::cols;
  const T inf = std::numeric_limits<T>::infinity();
  unsigned rows_hit = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t c_begin = i0 + r >= n ? C : std::max<int64_t>(0, i0 + r + 1 - j0);
    T* dist = tile + r * C;
    const T nr = ni[r], worst = row_worst[r];
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t c = 0; c < C; ++c) {
      T v = nr + nj[c] - T(2) * dist[c];
      v = v < T(0) ? T(0) : v;  // rounding of the expansion; the truth is >= 0
      v = c < c_begin ? inf : v;
      dist[c] = v;
      hit |= (int)(v < worst) | (int)(v <= col_worst[c]);
    }
    rows_hit |= (unsigned)(hit != 0) << r;
  }
  return rows_hit;
}

// The kKeep smallest (distance, index) offers, ascending lexicographically.
template <typename T>
struct Keep {
  T d[kKeep];
  int64_t j[kKeep];
  void clear() {
    for (int k = 0; k < kKeep; ++k) { d[k] = std::numeric_limits<T>::infinity(); j[k] = -1; }
  }
  static bool less(T a, int64_t ia, T b, int64_t ib) {
    return a < b || (a == b && (ib < 0 || (ia >= 0 && ia < ib)));
  }
  // Inserts (dist, idx) if it ranks among the kept; returns whether it did.
  bool offer(T dist, int64_t idx) {
    if (idx < 0 || !less(dist, idx, d[kKeep - 1], j[kKeep - 1])) return false;
    int k = kKeep - 1;
    while (k > 0 && less(dist, idx, d[k - 1], j[k - 1])) { d[k] = d[k - 1]; j[k] = j[k - 1]; --k; }
    d[k] = dist; j[k] = idx;
    return true;
  }
};

// Bound on |screened - true| squared distance between centred rows a, b of the working
// precision (unit roundoff u): centring rounding <= 5u(|a|^2+|b|^2); rounded norms
// <= u(|a|^2+|b|^2); the length-d dot product <= 1.01 d u |a||b| (any summation order),
// doubled; the final two additions <= 4u(|a|^2+|b|^2). Sum <= (1.01 d + 10) u (|a|^2+|b|^2);
// we use (2 d + 32) u (|a|^2 + max|b|^2), about twice that, as the margin.
template <typename T>
double screen_error_bound(int64_t d, double norm_a, double max_norm) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  return (2.0 * (double)d + 32.0) * u * (norm_a + max_norm);
}

template <typename T>
double exact_sq(const T* a, const T* b, int64_t d) {
  double s = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double t = (double)a[k] - (double)b[k];
    s += t * t;
  }
  return s;
}

template <typename TIn, typename T>
int64_t knn2_impl(const TIn* x, int64_t n, int64_t d, int64_t s0, int64_t s1, double* r1, double* r2,
                  int64_t* i1, int64_t* i2) {
  constexpr int64_t C = Panel<T>::cols;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t n_q = (n + kRows - 1) / kRows * kRows;  // queries padded to whole micro-tiles
  const int64_t n_panels = (n + C - 1) / C;
  std::vector<T> xo(n * d);                             // original values, contiguous (exact pass)
  std::vector<T> qtiles(n_q * d, T(0));                 // centred queries: [tile][k][r]
  std::vector<T> packed(n_panels * C * d, T(0));        // centred panels: [panel][k][c]
  std::vector<T> norms(n_panels * C, inf);              // padding columns: never offered
  std::vector<double> mean(d, 0.0);
  std::vector<double> norms64(n);

#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) xo[i * d + k] = (T)x[i * s0 + k * s1];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) mean[k] += (double)xo[i * d + k];
  std::vector<T> shift(d);
  for (int64_t k = 0; k < d; ++k) shift[k] = (T)(mean[k] / (double)n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    T* qt = qtiles.data() + (i / kRows) * kRows * d + (i % kRows);
    T* pan = packed.data() + (i / C) * C * d + (i % C);
    for (int64_t k = 0; k < d; ++k) {
      const T v = xo[i * d + k] - shift[k];
      s += (double)v * (double)v;
      qt[k * kRows] = v;
      pan[k * C] = v;
    }
    norms64[i] = s;
    norms[i] = (T)s;
  }
  const double max_norm = *std::max_element(norms64.begin(), norms64.end());

  // Screen. Row i's offers from pairs (i, j > i) go to the block-local list (one owner);
  // offers to row j go to this thread's own column lists (no races); all are merged after.
  const int64_t n_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int n_threads = omp_get_max_threads();
  std::vector<Keep<T>> cols((size_t)n_threads * n);
  std::vector<T> col_worst((size_t)n_threads * n_panels * C, inf);
  std::vector<Keep<T>> rows(n);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> tile(kRows * C);
    const int th = omp_get_thread_num();
    Keep<T>* mine = cols.data() + (size_t)th * n;
    T* worst = col_worst.data() + (size_t)th * n_panels * C;
    for (int64_t i = 0; i < n; ++i) mine[i].clear();
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t q0 = blk * kQueryBlock, q1 = std::min(n, q0 + kQueryBlock);
      Keep<T> local[kQueryBlock];
      for (int64_t li = 0; li < q1 - q0; ++li) local[li].clear();
      for (int64_t pnl = q0 / C; pnl < n_panels; ++pnl) {  // panels holding some j > q0
        const T* p = packed.data() + pnl * C * d;
        const int64_t j0 = pnl * C;
        for (int64_t qr = q0; qr < q1; qr += kRows) {
          if (j0 + C - 1 <= qr) continue;  // no j > i for these rows
          micro_tile<T>(qtiles.data() + qr * d, p, d, tile.data());
          T row_worst[kRows];
          for (int64_t r = 0; r < kRows; ++r) row_worst[r] = qr + r < q1 ? local[qr + r - q0].d[kKeep - 1] : inf;
          unsigned hits = tile_distances<T>(tile.data(), norms.data() + qr, norms.data() + j0, worst + j0,
                                            row_worst, qr, j0, q1);
          while (hits) {
            const int r = __builtin_ctz(hits);
            hits &= hits - 1;
            const int64_t i = qr + r;
            Keep<T>& ri = local[i - q0];
            const T* dist = tile.data() + r * C;
            for (int64_t c = std::max<int64_t>(0, i + 1 - j0); c < C; ++c) {
              const T v = dist[c];
              if (v == inf) continue;
              const int64_t j = j0 + c;
              ri.offer(v, j);
              if (mine[j].offer(v, i)) worst[j] = mine[j].d[kKeep - 1];
            }
          }
        }
      }
      for (int64_t i = q0; i < q1; ++i) rows[i] = local[i - q0];
    }
    // implicit barrier: every offer is in place
  }

  // Merge, certify, and fall back to an exact scan where the certificate fails.
  int64_t fallbacks = 0;
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : fallbacks)
  for (int64_t i = 0; i < n; ++i) {
    Keep<T> t = rows[i];
    for (int th = 0; th < n_threads; ++th) {
      const Keep<T>& o = cols[(size_t)th * n + i];
      for (int k = 0; k < kKeep; ++k) t.offer(o.d[k], o.j[k]);
    }
    const T* xi = xo.data() + i * d;
    Keep<double> best;
    best.clear();
    int valid = 0;
    for (int k = 0; k < kKeep; ++k) {
      if (t.j[k] < 0) continue;
      ++valid;
      best.offer(exact_sq(xi, xo.data() + t.j[k] * d, d), t.j[k]);
    }
    // Certified when every other point was a candidate, or when the kKeep-th screened value
    // is provably above the second exact distance.
    bool certified = valid == n - 1;
    if (!certified && valid == kKeep) {
      const double eps = screen_error_bound<T>(d, norms64[i], max_norm);
      certified = (double)t.d[kKeep - 1] - eps > best.d[1];
    }
    if (!certified) {
      ++fallbacks;
      best.clear();
      for (int64_t j = 0; j < n; ++j)
        if (j != i) best.offer(exact_sq(xi, xo.data() + j * d, d), j);
    }
    r1[i] = best.d[0]; r2[i] = best.d[1];
    i1[i] = best.j[0]; i2[i] = best.j[1];
  }
  return fallbacks;
}

}  // namespace

int64_t knn2(const void* x, DType dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, double* r1sq,
             double* r2sq, int64_t* idx1, int64_t* idx2) {
  if (n < 3) throw std::invalid_argument("knn2: needs n >= 3 points (each point needs two neighbours)");
  if (d < 1) throw std::invalid_argument("knn2: needs d >= 1 features");
  switch (dtype) {
    case DType::kFloat32:
      return knn2_impl<float, float>(static_cast<const float*>(x), n, d, s0, s1, r1sq, r2sq, idx1, idx2);
    case DType::kFloat64:
      return knn2_impl<double, double>(static_cast<const double*>(x), n, d, s0, s1, r1sq, r2sq, idx1, idx2);
    default:
      throw std::invalid_argument(std::string("knn2: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace hierfast::cpu
