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

namespace hierfast::cpu {

// Conv epilogue (csrc/cpu/conv_act.cpp). z, y: the conv output (N, C, HW) in NCHW
// (nhwc = false) or NHWC order, dtype `dtype`; y == z applies bias + activation in
// place, else z receives z + bias and y the activation. bias: C elements of `dtype`
// or null. stats: null or 3*C float64 accumulators (sum, sum of squares, count > 0 of
// y per channel), added to.
void conv_act_forward(void* z, void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc,
                      const void* bias, int act_code, double alpha, double* stats);

// Per-channel [sum, sum of squares, count > 0] of y (N x C x HW, NCHW or NHWC), float64, added
// to stats (C x 3); y is only read (csrc/cpu/conv_act.cpp).
void conv_act_stats(const void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc, double* stats);

// grad_z = grad_y * act'(saved); saved is y or z (see act::grad_from_output). All three
// share one layout. grad_bias: null or C float64 accumulators of sum(grad_z), added to.
void conv_act_backward(const void* grad_y, const void* saved, void* grad_z, DType dtype, int64_t N,
                       int64_t C, int64_t HW, bool nhwc, int act_code, double alpha, double* grad_bias);

}  // namespace hierfast::cpu

namespace hierfast::cpu {

// Two nearest neighbours of every row of x (n x d, element strides s0, s1; float32 or
// float64), self excluded, without storing the n x n distances (csrc/cpu/knn2.cpp).
// A centred screen (input precision, or bfloat16 on AVX512-BF16 CPUs when allow_bf16) keeps
// candidates per row; their exact float64 squared distances (sum of squared differences) are
// certified against a rounding bound; uncertified rows get a float32 screen of their own
// (bfloat16 path) and then an exact scan. Writes r1sq <= r2sq (n float64 each) and idx1,
// idx2 (n int64); ties -> lower index. stats (3 int64): bfloat16 screen used (0/1), rows
// re-screened in float32, rows exactly scanned.
void knn2(const void* x, DType dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, double* r1sq,
          double* r2sq, int64_t* idx1, int64_t* idx2, bool allow_bf16, int64_t* stats);

// Fused backward of y = act(depthwise_conv(x, w) + b), channels_last (csrc/cpu/dw_conv_backward.cpp):
// grad_y, saved (y for the ReLU family, z otherwise; N x OH x OW x C), x (N x H x W x C), w (C x KH x KW)
// of dtype (float32 or bfloat16; float32 arithmetic); writes grad_x (N x H x W x C) when want_x, grad_w (C x KH x KW) and
// grad_b (C) in float64. geometry: N, C, H, W, OH, OW, KH, KW, stride h/w, padding h/w, dilation h/w.
void dw_conv_act_backward(const void* grad_y, const void* saved, const void* x, const void* w, void* grad_x,
                          double* grad_w, double* grad_b, DType dtype, const int64_t* geometry, int act_code,
                          double alpha, bool want_x);

}  // namespace hierfast::cpu

namespace hierfast::cpu {

// Fused forward y = act(depthwise_conv(x, w) + b), channels_last (csrc/cpu/dw_conv_forward.cpp):
// x (N x H x W x C), w (C x KH x KW), bias (C) or null, float32; writes y (N x OH x OW x C), z (the
// pre-activation, same shape) when non-null, and adds per-channel [sum, sum of squares, count > 0]
// of y to stats (C x 3 float64) when non-null. geometry as dw_conv_act_backward's.
void dw_conv_act_forward(const void* x, const void* w, const void* bias, void* y, void* z, double* stats,
                         DType dtype, const int64_t* geometry, int act_code, double alpha);

}  // namespace hierfast::cpu
