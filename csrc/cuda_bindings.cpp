// pybind11 module hierfast._C_cuda: host launchers of the CUDA kernels. Linked with
// the static CUDA runtime, so importing works on machines without a GPU; launch
// errors come back as RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "hierfast/cuda_kernels.h"

namespace py = pybind11;
using hierfast::DType;

namespace {
void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("hierfast CUDA kernel failed: " + err);
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hierfast CUDA kernels (static cudart, no libtorch)";
  m.def(
      "gram_epilogue",
      [](uintptr_t gram, int in_dtype, int64_t n, int64_t s0, int64_t s1, uintptr_t out,
         int out_dtype, uintptr_t rowsum, uintptr_t total, bool unbiased, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::gram_epilogue(reinterpret_cast<const void*>(gram), DType(in_dtype), n,
                                              s0, s1, reinterpret_cast<void*>(out), DType(out_dtype),
                                              reinterpret_cast<double*>(rowsum),
                                              reinterpret_cast<double*>(total), unbiased, stream);
        }
        check(err);
      });
  m.def(
      "center_columns",
      [](uintptr_t x, int in_dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, uintptr_t out,
         int out_dtype, uintptr_t mean, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::center_columns(reinterpret_cast<const void*>(x), DType(in_dtype), n, d,
                                               s0, s1, reinterpret_cast<void*>(out), DType(out_dtype),
                                               reinterpret_cast<double*>(mean), stream);
        }
        check(err);
      });
  m.def(
      "conv_act_forward",
      [](uintptr_t z, uintptr_t y, int dtype, int64_t N, int64_t C, int64_t HW, bool nhwc, uintptr_t bias,
         int act_code, double alpha, uintptr_t stats, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::conv_act_forward(reinterpret_cast<void*>(z), reinterpret_cast<void*>(y),
                                                 DType(dtype), N, C, HW, nhwc,
                                                 reinterpret_cast<const void*>(bias), act_code, alpha,
                                                 reinterpret_cast<double*>(stats), stream);
        }
        check(err);
      });
  m.def(
      "conv_act_backward",
      [](uintptr_t grad_y, uintptr_t saved, uintptr_t grad_z, int dtype, int64_t N, int64_t C, int64_t HW,
         bool nhwc, int act_code, double alpha, uintptr_t grad_bias, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::conv_act_backward(reinterpret_cast<const void*>(grad_y),
                                                  reinterpret_cast<const void*>(saved),
                                                  reinterpret_cast<void*>(grad_z), DType(dtype), N, C, HW, nhwc,
                                                  act_code, alpha, reinterpret_cast<double*>(grad_bias), stream);
        }
        check(err);
      });
  m.def(
      "channel_topk",
      [](uintptr_t x, int dtype, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc, int64_t ss,
         int64_t base, int64_t k, int mode, uintptr_t vals, uintptr_t idx, uintptr_t pos, uintptr_t bad,
         uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::channel_topk(reinterpret_cast<const void*>(x), DType(dtype), B, C, S, sb, sc,
                                             ss, base, k, mode, reinterpret_cast<double*>(vals),
                                             reinterpret_cast<int64_t*>(idx), reinterpret_cast<int64_t*>(pos),
                                             reinterpret_cast<int64_t*>(bad), stream);
        }
        check(err);
      });
  m.def(
      "knn2_screen",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, uintptr_t cand_d,
         uintptr_t cand_j, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = hierfast::cuda::knn2_screen(reinterpret_cast<const void*>(x), DType(dtype), n, d, s0, s1,
                                            reinterpret_cast<double*>(cand_d), reinterpret_cast<int64_t*>(cand_j),
                                            stream);
        }
        check(err);
      });
  m.def("device_count", []() {
    std::string err;
    int c = hierfast::cuda::device_count(&err);
    return py::make_tuple(c, err);
  });
}
