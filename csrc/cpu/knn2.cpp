// CPU fused pairwise distance + 2-nearest-neighbour search (definition:
// hierfast/ops/knn2.py::knn2_reference). The n x n distance matrix is never stored.
//
// 1. Screen. The data are centred (distances do not change; the norms, and with them the
//    rounding error of the expansion, shrink), and squared distances ||q||^2 + ||r||^2 - 2 q.r
//    are formed tile by tile from a register-blocked dot-product micro-kernel (kRows query
//    rows x 32 reference points; both sides packed so the inner loop is a broadcast-FMA over
//    vector lanes). Each unordered pair is scored once (symmetry) and offered to both of its
//    rows; each row keeps its K smallest offers, ranked by (distance, index). A vectorised
//    threshold test rejects almost every pair before the scalar insertion runs.
//    On CPUs with AVX512-BF16 (float32 input) the screen runs on bfloat16 copies with float32
//    accumulation (vdpbf16ps: twice the multiply-adds per instruction of float32 FMA) and
//    keeps K = 8; elsewhere it runs in the input precision with K = 4.
// 2. Certify. The kept candidates' squared distances are recomputed exactly in float64 from
//    the original values. A rigorous bound on the screen's error (rounding of the expansion,
//    and for bfloat16 the exact norms of the rounding residuals) proves the two smallest
//    exact values are the true two nearest when the K-th screened value, moved by the bound,
//    still exceeds the second exact one: every point not kept is then provably farther.
//    Rows without that proof get a float32 screen of their own (bfloat16 path), and if that
//    cannot certify either (near ties, duplicates in threes), an exact float64 scan. The
//    result is therefore exact whatever the data's offset, scale or ties.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HIERFAST_KNN2_BF16 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "hierfast/cpu_kernels.h"

namespace hierfast::cpu {
namespace {

constexpr int64_t kRows = 8;         // query rows per micro-tile
constexpr int64_t kCols = 32;        // reference points per packed panel (two 512-bit float vectors)
constexpr int64_t kQueryBlock = 96;  // query rows sharing one pass over a reference panel (L2)

// acc[r][c] = sum_k q[k][r] * p[k][c] for one packed query micro-tile q (d x kRows) and
// one packed panel p (d x kCols). Cloned for AVX-512 / AVX2 / baseline.
template <typename T>
HIERFAST_SIMD_CLONES void micro_tile(const T* __restrict__ q, const T* __restrict__ p, int64_t d,
                                     T* __restrict__ out) {
  T acc[kRows][kCols] = {};
  for (int64_t k = 0; k < d; ++k) {
    const T* pk = p + k * kCols;
    const T* qk = q + k * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      const T a = qk[r];
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += a * pk[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kCols; ++c) out[r * kCols + c] = acc[r][c];
}

#ifdef HIERFAST_KNN2_BF16
// The same on bfloat16 pairs: q is [kp][kRows] and p is [kp][kCols] 32-bit words, each
// holding the bfloat16 values of features 2k and 2k+1; float32 accumulation.
__attribute__((target("avx512f,avx512bf16"))) void micro_tile_bf16(const uint32_t* __restrict__ q,
                                                                  const uint32_t* __restrict__ p, int64_t kp,
                                                                  float* __restrict__ out) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(p + k * kCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(p + k * kCols + 16);
    const uint32_t* qk = q + k * kRows;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qk[r]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(out + r * kCols, acc[r][0]);
    _mm512_storeu_ps(out + r * kCols + 16, acc[r][1]);
  }
}

bool cpu_has_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
}
#endif

// float -> bfloat16 (round to nearest even; finite input) and back.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Turns a micro-tile of dot products into squared distances (in place) and returns a bit
// per row that has an offer that could enter the row's list (< row_worst[r]) or a column's
// list (<= col_worst[c]; ties are settled by index in the scalar insertion). Pairs with
// j <= i (and rows at or past row_end) are masked to +inf.
template <typename T>
HIERFAST_SIMD_CLONES unsigned tile_distances(T* __restrict__ tile, const T* __restrict__ ni,
                                             const T* __restrict__ nj, const T* __restrict__ col_worst,
                                             const T* __restrict__ row_worst, int64_t i0, int64_t j0,
                                             int64_t row_end) {
  const T inf = std::numeric_limits<T>::infinity();
  unsigned rows_hit = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t c_begin = i0 + r >= row_end ? kCols : std::max<int64_t>(0, i0 + r + 1 - j0);
    T* dist = tile + r * kCols;
    const T nr = ni[r], worst = row_worst[r];
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t c = 0; c < kCols; ++c) {
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

// The K smallest (distance, index) offers, ascending lexicographically.
template <typename T, int K>
struct Keep {
  T d[K];
  int64_t j[K];
  void clear() {
    for (int k = 0; k < K; ++k) { d[k] = std::numeric_limits<T>::infinity(); j[k] = -1; }
  }
  T worst() const { return d[K - 1]; }
  static bool less(T a, int64_t ia, T b, int64_t ib) {
    return a < b || (a == b && (ib < 0 || (ia >= 0 && ia < ib)));
  }
  // Inserts (dist, idx) if it ranks among the kept; returns whether it did.
  bool offer(T dist, int64_t idx) {
    if (idx < 0 || !less(dist, idx, d[K - 1], j[K - 1])) return false;
    int k = K - 1;
    while (k > 0 && less(dist, idx, d[k - 1], j[k - 1])) { d[k] = d[k - 1]; j[k] = j[k - 1]; --k; }
    d[k] = dist; j[k] = idx;
    return true;
  }
};

// Symmetric screen: every unordered pair {i < j} is scored once by tile_fn(qr, panel, tile)
// (dot products of query micro-tile qr.. and reference panel) and offered to both rows.
// Row i's offers from pairs (i, j > i) go to a block-local list (one owner); offers to row
// j go to this thread's own column lists (no races); all are merged at the end.
// norms: squared norms padded to whole panels with +inf (padding is never offered).
template <typename T, int K, typename TileFn>
std::vector<Keep<T, K>> screen_pairs(int64_t n, const T* norms, TileFn tile_fn) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t n_panels = (n + kCols - 1) / kCols;
  const int64_t n_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int n_threads = omp_get_max_threads();
  std::vector<Keep<T, K>> cols((size_t)n_threads * n);
  std::vector<T> col_worst((size_t)n_threads * n_panels * kCols, inf);
  std::vector<Keep<T, K>> rows(n);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<T> tile(kRows * kCols);
    const int th = omp_get_thread_num();
    Keep<T, K>* mine = cols.data() + (size_t)th * n;
    T* worst = col_worst.data() + (size_t)th * n_panels * kCols;
    for (int64_t i = 0; i < n; ++i) mine[i].clear();
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t q0 = blk * kQueryBlock, q1 = std::min(n, q0 + kQueryBlock);
      Keep<T, K> local[kQueryBlock];
      for (int64_t li = 0; li < q1 - q0; ++li) local[li].clear();
      for (int64_t pnl = q0 / kCols; pnl < n_panels; ++pnl) {  // panels holding some j > q0
        const int64_t j0 = pnl * kCols;
        for (int64_t qr = q0; qr < q1; qr += kRows) {
          if (j0 + kCols - 1 <= qr) continue;  // no j > i for these rows
          tile_fn(qr, pnl, tile.data());
          T row_worst[kRows];
          for (int64_t r = 0; r < kRows; ++r) row_worst[r] = qr + r < q1 ? local[qr + r - q0].worst() : inf;
          unsigned hits = tile_distances<T>(tile.data(), norms + qr, norms + j0, worst + j0, row_worst, qr, j0, q1);
          while (hits) {
            const int r = __builtin_ctz(hits);
            hits &= hits - 1;
            const int64_t i = qr + r;
            Keep<T, K>& ri = local[i - q0];
            const T* dist = tile.data() + r * kCols;
            // Pre-filter on the thresholds: a list is only touched by an offer that enters it.
            for (int64_t c = std::max<int64_t>(0, i + 1 - j0); c < kCols; ++c) {
              const T v = dist[c];
              if (v == inf) continue;
              const int64_t j = j0 + c;
              if (v < ri.worst()) ri.offer(v, j);
              if (v <= worst[j] && mine[j].offer(v, i)) worst[j] = mine[j].worst();
            }
          }
        }
      }
      for (int64_t i = q0; i < q1; ++i) rows[i] = local[i - q0];
    }
    // implicit barrier: every offer is in place
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int t = 0; t < n_threads; ++t) {
        const Keep<T, K>& o = cols[(size_t)t * n + i];
        for (int k = 0; k < K; ++k) rows[i].offer(o.d[k], o.j[k]);
      }
  }
  return rows;
}

// Whether this thread flushes subnormals (x86 MXCSR: FTZ 0x8000 flushes results, DAZ 0x0040
// reads subnormal inputs as zero). Elsewhere we cannot tell cheaply: assume it may.
inline bool thread_flushes_denormals() {
#if defined(__x86_64__) || defined(__i386__)
  return (_mm_getcsr() & 0x8040u) != 0;
#else
  return true;
#endif
}

// Whether the calling thread or any OpenMP team thread flushes (MXCSR is per thread).
bool team_flushes_denormals() {
  bool any = thread_flushes_denormals();
  bool team = false;
#pragma omp parallel reduction(|| : team)
  team = thread_flushes_denormals();
  return any || team;
}

// Bound on |screened - true| squared distance between centred rows a, b of the working
// precision (unit roundoff u): centring rounding <= 5u(|a|^2+|b|^2); rounded norms
// <= u(|a|^2+|b|^2); the length-d dot product <= 1.01 d u |a||b| (any summation order),
// doubled; the final two additions <= 4u(|a|^2+|b|^2). Sum <= (1.01 d + 10) u (|a|^2+|b|^2);
// we use (2 d + 32) u (|a|^2 + max|b|^2), about twice that, as the margin. The relative
// bound fails where products and sums underflow: each of the ~4 d + 8 operations then errs
// by up to the subnormal spacing (denorm_min) with gradual underflow, or by a whole flushed
// value (< the smallest normal) where the screen flushes (FTZ/DAZ set, or vdpbf16ps, which
// always does): hence the absolute term (4 d + 16) * (denorm_min, or min normal if `flushes`).
template <typename T>
double screen_error_bound(int64_t d, double norm_a, double max_norm, bool flushes) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double tiny = flushes ? (double)std::numeric_limits<T>::min() : (double)std::numeric_limits<T>::denorm_min();
  return (2.0 * (double)d + 32.0) * u * (norm_a + max_norm) + (4.0 * (double)d + 16.0) * tiny;
}

template <typename T>
HIERFAST_SIMD_CLONES double exact_sq(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < d; ++k) {
    const double t = (double)a[k] - (double)b[k];
    s += t * t;
  }
  return s;
}

// The data every stage reads: original values (exact pass) and centred values (screens).
template <typename T>
struct Prepared {
  int64_t n, d;
  const T* xo;                   // original values, (n, d) row-major: the input or xo_copy
  std::vector<T> xo_copy, xc;    // xc: centred values, (n, d) row-major
  std::vector<double> norms64;   // squared norms of the centred rows
  double max_norm = 0.0;
  bool flushes = true;           // subnormals may be flushed (FTZ/DAZ): see screen_error_bound
};

template <typename TIn, typename T>
Prepared<T> prepare(const TIn* x, int64_t n, int64_t d, int64_t s0, int64_t s1) {
  Prepared<T> P{n, d, nullptr, {}, std::vector<T>(n * d), std::vector<double>(n)};
  P.flushes = team_flushes_denormals();  // before centring: the centring rounds too
  if constexpr (std::is_same_v<TIn, T>) {
    if (s1 == 1 && s0 == d) P.xo = x;  // contiguous input of the working type: no copy
  }
  if (P.xo == nullptr) {
    P.xo_copy.resize(n * d);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) P.xo_copy[i * d + k] = (T)x[i * s0 + k * s1];
    P.xo = P.xo_copy.data();
  }
  std::vector<double> mean(d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) mean[k] += (double)P.xo[i * d + k];
  std::vector<T> shift(d);
  for (int64_t k = 0; k < d; ++k) shift[k] = (T)(mean[k] / (double)n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      const T v = P.xo[i * d + k] - shift[k];
      P.xc[i * d + k] = v;
      s += (double)v * (double)v;
    }
    P.norms64[i] = s;
  }
  P.max_norm = *std::max_element(P.norms64.begin(), P.norms64.end());
  return P;
}

// Exact two nearest of row i among candidates cand (K, -1 = none): ascending (value, index).
template <typename T, int K>
Keep<double, 2> exact_pair(const Prepared<T>& P, int64_t i, const int64_t* cand, int* valid) {
  Keep<double, 2> best;
  best.clear();
  *valid = 0;
  const T* xi = P.xo + i * P.d;
  for (int k = 0; k < K; ++k) {
    if (cand[k] < 0) continue;
    ++*valid;
    best.offer(exact_sq(xi, P.xo + cand[k] * P.d, P.d), cand[k]);
  }
  return best;
}

template <typename T>
Keep<double, 2> exact_scan(const Prepared<T>& P, int64_t i) {
  Keep<double, 2> best;
  best.clear();
  const T* xi = P.xo + i * P.d;
  for (int64_t j = 0; j < P.n; ++j)
    if (j != i) best.offer(exact_sq(xi, P.xo + j * P.d, P.d), j);
  return best;
}

// Reference points packed for micro_tile: panels [panel][k][c] of the centred rows, and their
// squared norms padded to whole panels with +inf (padding is never offered).
template <typename T>
struct Panels {
  std::vector<T> packed, norms;
};

template <typename T>
Panels<T> pack_panels(const Prepared<T>& P) {
  const int64_t n = P.n, d = P.d, n_panels = (n + kCols - 1) / kCols;
  Panels<T> out{std::vector<T>(n_panels * kCols * d, T(0)),
                std::vector<T>(n_panels * kCols, std::numeric_limits<T>::infinity())};
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* pan = out.packed.data() + (i / kCols) * kCols * d + (i % kCols);
    for (int64_t k = 0; k < d; ++k) pan[k * kCols] = P.xc[i * d + k];
    out.norms[i] = (T)P.norms64[i];
  }
  return out;
}

// Query rows packed as micro-tiles [tile][k][r]: row a of the tiles is centred row row_of(a).
template <typename T, typename RowOf>
std::vector<T> pack_queries(const Prepared<T>& P, int64_t m, RowOf row_of) {
  const int64_t d = P.d;
  std::vector<T> qtiles((m + kRows - 1) / kRows * kRows * d, T(0));
#pragma omp parallel for schedule(static)
  for (int64_t a = 0; a < m; ++a) {
    T* qt = qtiles.data() + (a / kRows) * kRows * d + (a % kRows);
    const T* row = P.xc.data() + row_of(a) * d;
    for (int64_t k = 0; k < d; ++k) qt[k * kRows] = row[k];
  }
  return qtiles;
}

// Screen in the working precision T (K = 4), symmetric over all rows.
template <typename T>
std::vector<Keep<T, 4>> screen_native(const Prepared<T>& P) {
  const int64_t d = P.d;
  const Panels<T> ref = pack_panels(P);
  const std::vector<T> qtiles = pack_queries(P, P.n, [](int64_t a) { return a; });
  return screen_pairs<T, 4>(P.n, ref.norms.data(), [&](int64_t qr, int64_t pnl, T* tile) {
    micro_tile<T>(qtiles.data() + qr * d, ref.packed.data() + pnl * kCols * d, d, tile);
  });
}

// Screen of the query rows `rows` only against every row (no symmetry), float32, K = 4:
// for the rows the bfloat16 screen could not certify.
std::vector<Keep<float, 4>> screen_rows(const Prepared<float>& P, const std::vector<int64_t>& rows) {
  const int64_t n = P.n, d = P.d, m = (int64_t)rows.size();
  const int64_t n_panels = (n + kCols - 1) / kCols;
  const int64_t m_q = (m + kRows - 1) / kRows * kRows;
  const Panels<float> ref = pack_panels(P);
  const std::vector<float> qtiles = pack_queries(P, m, [&](int64_t a) { return rows[a]; });
  std::vector<Keep<float, 4>> out(m);
  for (auto& o : out) o.clear();
#pragma omp parallel
  {
    std::vector<float> tile(kRows * kCols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t qr = 0; qr < m_q; qr += kRows) {
      for (int64_t pnl = 0; pnl < n_panels; ++pnl) {
        micro_tile<float>(qtiles.data() + qr * d, ref.packed.data() + pnl * kCols * d, d, tile.data());
        for (int64_t r = 0; r < kRows && qr + r < m; ++r) {
          Keep<float, 4>& o = out[qr + r];
          const int64_t self = rows[qr + r];
          const float qn = (float)P.norms64[self];
          for (int64_t c = 0; c < kCols; ++c) {
            const int64_t j = pnl * kCols + c;
            float v = qn + ref.norms[j] - 2.f * tile[r * kCols + c];
            v = v < 0.f ? 0.f : v;
            if (v < o.worst() && j != self && j < n) o.offer(v, j);
          }
        }
      }
    }
  }
  return out;
}

// Certifies a native-precision screen of row i; on failure returns false.
template <typename T, int K>
bool certify_native(const Prepared<T>& P, int64_t i, const Keep<T, K>& t, Keep<double, 2>* best) {
  int valid = 0;
  *best = exact_pair<T, K>(P, i, t.j, &valid);
  if (valid == P.n - 1) return true;  // every other row was a candidate
  if (valid < K) return false;
  const double eps = screen_error_bound<T>(P.d, P.norms64[i], P.max_norm, P.flushes);
  return (double)t.d[K - 1] - eps > best->d[1];
}

void write(const Keep<double, 2>& b, int64_t i, double* r1, double* r2, int64_t* i1, int64_t* i2) {
  r1[i] = b.d[0]; r2[i] = b.d[1];
  i1[i] = b.j[0]; i2[i] = b.j[1];
}

template <typename T>
int64_t knn2_native(const Prepared<T>& P, double* r1, double* r2, int64_t* i1, int64_t* i2) {
  const std::vector<Keep<T, 4>> rows = screen_native<T>(P);
  int64_t fallbacks = 0;
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : fallbacks)
  for (int64_t i = 0; i < P.n; ++i) {
    Keep<double, 2> best;
    if (!certify_native<T, 4>(P, i, rows[i], &best)) {
      ++fallbacks;
      best = exact_scan(P, i);
    }
    write(best, i, r1, r2, i1, i2);
  }
  return fallbacks;
}

#ifdef HIERFAST_KNN2_BF16
// bfloat16 screen (K = 8) with certification; uncertified rows go to screen_rows (float32)
// and then, if still uncertified, to the exact scan.
void knn2_bf16(const Prepared<float>& P, double* r1, double* r2, int64_t* i1, int64_t* i2, int64_t* stats) {
  const int64_t n = P.n, d = P.d, kp = (d + 1) / 2;
  const int64_t n_q = (n + kRows - 1) / kRows * kRows;
  const int64_t n_panels = (n + kCols - 1) / kCols;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<uint32_t> qtiles(n_q * kp, 0u), packed(n_panels * kCols * kp, 0u);
  std::vector<float> norms(n_panels * kCols, inf);
  std::vector<double> resid(n);  // |x_c - bf16(x_c)| + u |x_c|: how far the rounded row may be
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t* qt = qtiles.data() + (i / kRows) * kRows * kp + (i % kRows);
    uint32_t* pan = packed.data() + (i / kCols) * kCols * kp + (i % kCols);
    double s = 0.0, lo = 0.0;
    const float* row = P.xc.data() + i * d;
    for (int64_t k2 = 0; k2 < kp; ++k2) {
      uint16_t h[2];
      for (int e = 0; e < 2; ++e) {
        const int64_t k = 2 * k2 + e;
        const float v = k < d ? row[k] : 0.f;
        h[e] = to_bf16(v);
        const double r = (double)from_bf16(h[e]);
        s += r * r;
        lo += ((double)v - r) * ((double)v - r);
      }
      const uint32_t word = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
      qt[k2 * kRows] = pan[k2 * kCols] = word;
    }
    norms[i] = (float)s;
    resid[i] = std::sqrt(lo) * (1.0 + 1e-12) + (std::numeric_limits<float>::epsilon() / 2) * std::sqrt(P.norms64[i]);
  }
  double max_bnorm = 0.0, max_resid = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    max_bnorm = std::max(max_bnorm, (double)norms[i]);
    max_resid = std::max(max_resid, resid[i]);
  }
  const std::vector<Keep<float, 8>> rows = screen_pairs<float, 8>(n, norms.data(), [&](int64_t qr, int64_t pnl, float* tile) {
    micro_tile_bf16(qtiles.data() + qr * kp, packed.data() + pnl * kCols * kp, kp, tile);
  });
  // Certificate: a row j not kept has screened value >= a = rows[i].d[7], so its distance
  // between the bfloat16 rows is >= a - eps (eps: float32 rounding of the expansion on those
  // rows), and its true distance >= (sqrt(a - eps) - resid_i - max resid)^2.
  std::vector<int64_t> redo;
  std::vector<Keep<double, 2>> best(n);
#pragma omp parallel
  {
    std::vector<int64_t> mine;
#pragma omp for schedule(dynamic, 64) nowait
    for (int64_t i = 0; i < n; ++i) {
      // Candidates in screened order; stop once the next one's lower bound exceeds the second
      // exact distance so far (it and every later one are then provably farther).
      const Keep<float, 8>& t = rows[i];
      const double eps = screen_error_bound<float>(d, (double)norms[i], max_bnorm, /*flushes=*/true);  // vdpbf16ps flushes
      const float* xi = P.xo + i * d;
      Keep<double, 2>& b = best[i];
      b.clear();
      // true when every row whose screened value is >= `screened` is provably farther than b.d[1]
      auto farther = [&](float screened) {
        const double a = (double)screened - eps;
        const double root = a > 0 ? std::sqrt(a) - resid[i] - max_resid : -1.0;
        return root > 0 && root * root > b.d[1];
      };
      bool ok = false;
      int k = 0;
      for (; k < 8 && t.j[k] >= 0; ++k) {
        if (k >= 2 && farther(t.d[k])) { ok = true; break; }
        b.offer(exact_sq(xi, P.xo + t.j[k] * d, d), t.j[k]);
      }
      if (!ok && k < 8) ok = true;  // fewer than 8 candidates: n - 1 < 8, every other row was one
      if (!ok) ok = farther(t.d[7]);  // all 8 exact: rows not kept have screened values >= d[7]
      if (!ok) mine.push_back(i);
    }
#pragma omp critical
    redo.insert(redo.end(), mine.begin(), mine.end());
  }
  std::sort(redo.begin(), redo.end());
  int64_t fallbacks = 0;
  if (!redo.empty()) {
    const std::vector<Keep<float, 4>> again = screen_rows(P, redo);
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : fallbacks)
    for (int64_t a = 0; a < (int64_t)redo.size(); ++a) {
      const int64_t i = redo[a];
      if (!certify_native<float, 4>(P, i, again[a], &best[i])) {
        ++fallbacks;
        best[i] = exact_scan(P, i);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) write(best[i], i, r1, r2, i1, i2);
  stats[0] = 1;
  stats[1] = (int64_t)redo.size();
  stats[2] = fallbacks;
}
#endif

}  // namespace

void knn2(const void* x, DType dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, double* r1sq,
          double* r2sq, int64_t* idx1, int64_t* idx2, bool allow_bf16, int64_t* stats) {
  stats[0] = stats[1] = stats[2] = 0;
  if (n < 3) throw std::invalid_argument("knn2: needs n >= 3 points (each point needs two neighbours)");
  if (d < 1) throw std::invalid_argument("knn2: needs d >= 1 features");
  switch (dtype) {
    case DType::kFloat32: {
      const Prepared<float> P = prepare<float, float>(static_cast<const float*>(x), n, d, s0, s1);
#ifdef HIERFAST_KNN2_BF16
      // bfloat16 pays when the GEMM dominates; its products must stay clear of the
      // float32 denormal range (vdpbf16ps flushes denormals), hence the scale guard.
      const double scale = std::sqrt(P.max_norm);
      if (allow_bf16 && cpu_has_bf16() && n >= 512 && d >= 32 && scale > 1e-15 && scale < 1e15) {
        knn2_bf16(P, r1sq, r2sq, idx1, idx2, stats);
        return;
      }
#endif
      stats[2] = knn2_native<float>(P, r1sq, r2sq, idx1, idx2);
      return;
    }
    case DType::kFloat64: {
      const Prepared<double> P = prepare<double, double>(static_cast<const double*>(x), n, d, s0, s1);
      stats[2] = knn2_native<double>(P, r1sq, r2sq, idx1, idx2);
      return;
    }
    default:
      throw std::invalid_argument(std::string("knn2: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace hierfast::cpu
