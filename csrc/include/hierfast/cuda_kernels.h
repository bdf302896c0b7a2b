// Host launchers of the CUDA kernels (csrc/cuda/*.cu), bound in csrc/cuda_bindings.cpp.
// Each returns an empty string on success, or the CUDA error text: a kernel launched
// on a machine without a GPU fails silently unless cudaGetLastError() is checked.
#pragma once
#include <cstdint>
#include <string>

#include "hierfast/common.h"

namespace hierfast::cuda {

std::string gram_epilogue(const void* gram, DType in_dtype, int64_t n, int64_t s0, int64_t s1,
                          void* out, DType out_dtype, double* rowsum, double* total,
                          bool unbiased, uintptr_t stream);

std::string center_columns(const void* x, DType in_dtype, int64_t n, int64_t d, int64_t s0,
                           int64_t s1, void* out, DType out_dtype, double* mean, uintptr_t stream);

// Conv epilogue and its backward (csrc/cuda/conv_act.cu); arguments as the CPU
// versions in cpu_kernels.h, plus the stream.
std::string conv_act_forward(void* z, void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc,
                             const void* bias, int act_code, double alpha, double* stats, uintptr_t stream);
std::string conv_act_backward(const void* grad_y, const void* saved, void* grad_z, DType dtype, int64_t N,
                              int64_t C, int64_t HW, bool nhwc, int act_code, double alpha, double* grad_bias,
                              uintptr_t stream);

std::string channel_topk(const void* x, DType dtype, int64_t B, int64_t C, int64_t S, int64_t sb,
                         int64_t sc, int64_t ss, int64_t base, int64_t k, int mode, double* vals,
                         int64_t* idx, int64_t* pos, int64_t* bad, uintptr_t stream);

// Screen for the two nearest neighbours (csrc/cuda/knn2.cu): the 4 smallest squared distances
// per row of x (n x d, self excluded) in the input precision, ascending, ties -> lower index:
// cand_d (n x 4 float64), cand_j (n x 4 int64, -1: none).
std::string knn2_screen(const void* x, DType dtype, int64_t n, int64_t d, int64_t s0, int64_t s1,
                        double* cand_d, int64_t* cand_j, uintptr_t stream);

// Number of visible devices, or a negative value with the error in `err`.
int device_count(std::string* err);

}  // namespace hierfast::cuda
