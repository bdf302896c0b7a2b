// Declarations of the CPU kernels bound in csrc/bindings.cpp.
#pragma once
#include <cstdint>
#include "hierfast/common.h"

namespace hierfast::cpu {

// Gram epilogue: from a symmetric Gram K (n x n, element strides s0, s1) write the
// centred (biased: H K H) or U-centred (unbiased, Szekely & Rizzo 2014) Gram into
// `out` (n*n contiguous, row-major), and the row sums (n, float64) and total
// (1, float64) of K (diagonal excluded when unbiased). Requires n >= 4 when unbiased.
void gram_epilogue(const void* gram, DType in_dtype, int64_t n, int64_t s0, int64_t s1,
                   void* out, DType out_dtype, double* rowsum, double* total, bool unbiased);

// Column-centring of features: x (n x d, element strides s0, s1) ->
// out (n x d contiguous, float32 or float64) = x - mean, mean (d, float64).
void center_columns(const void* x, DType in_dtype, int64_t n, int64_t d, int64_t s0, int64_t s1,
                    void* out, DType out_dtype, double* mean);

// Per-channel spatial max (first argmax) or mean of x (B, C, S; element strides sb, sc,
// ss), merged into running top-k lists vals/idx/pos (C, k) sorted by (value desc, index
// asc); dataset index = base + b; mode 0 = max, 1 = mean; rows with NaN counted in bad (C,).
void channel_topk(const void* x, DType dtype, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc,
                  int64_t ss, int64_t base, int64_t k, int mode, double* vals, int64_t* idx, int64_t* pos,
                  int64_t* bad);

}  // namespace hierfast::cpu
