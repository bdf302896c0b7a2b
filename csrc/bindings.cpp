// pybind11 module hierfast._C: CPU kernels. Arguments are raw addresses
// (tensor.data_ptr()), element strides and dtype codes; Python validates them.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "hierfast/cpu_kernels.h"

namespace py = pybind11;
using hierfast::DType;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hierfast CPU kernels (C++17/OpenMP, no libtorch)";
  m.def(
      "gram_epilogue",
      [](uintptr_t gram, int in_dtype, int64_t n, int64_t s0, int64_t s1, uintptr_t out,
         int out_dtype, uintptr_t rowsum, uintptr_t total, bool unbiased) {
        py::gil_scoped_release nogil;
        hierfast::cpu::gram_epilogue(ptr<const void>(gram), DType(in_dtype), n, s0, s1,
                                     ptr<void>(out), DType(out_dtype), ptr<double>(rowsum),
                                     ptr<double>(total), unbiased);
      },
      py::arg("gram"), py::arg("in_dtype"), py::arg("n"), py::arg("s0"), py::arg("s1"),
      py::arg("out"), py::arg("out_dtype"), py::arg("rowsum"), py::arg("total"),
      py::arg("unbiased"));
  m.def(
      "center_columns",
      [](uintptr_t x, int in_dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, uintptr_t out,
         int out_dtype, uintptr_t mean) {
        py::gil_scoped_release nogil;
        hierfast::cpu::center_columns(ptr<const void>(x), DType(in_dtype), n, d, s0, s1,
                                      ptr<void>(out), DType(out_dtype), ptr<double>(mean));
      },
      py::arg("x"), py::arg("in_dtype"), py::arg("n"), py::arg("d"), py::arg("s0"), py::arg("s1"),
      py::arg("out"), py::arg("out_dtype"), py::arg("mean"));
  m.def(
      "conv_act_forward",
      [](uintptr_t z, uintptr_t y, int dtype, int64_t N, int64_t C, int64_t HW, bool nhwc,
         uintptr_t bias, int act_code, double alpha, uintptr_t stats) {
        py::gil_scoped_release nogil;
        hierfast::cpu::conv_act_forward(ptr<void>(z), ptr<void>(y), DType(dtype), N, C, HW, nhwc,
                                        ptr<const void>(bias), act_code, alpha, ptr<double>(stats));
      },
      py::arg("z"), py::arg("y"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("HW"),
      py::arg("nhwc"), py::arg("bias"), py::arg("act_code"), py::arg("alpha"), py::arg("stats"));
  m.def(
      "conv_act_stats",
      [](uintptr_t y, int dtype, int64_t N, int64_t C, int64_t HW, bool nhwc, uintptr_t stats) {
        py::gil_scoped_release nogil;
        hierfast::cpu::conv_act_stats(ptr<const void>(y), DType(dtype), N, C, HW, nhwc, ptr<double>(stats));
      },
      py::arg("y"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("nhwc"),
      py::arg("stats"));
  m.def(
      "conv_act_backward",
      [](uintptr_t grad_y, uintptr_t saved, uintptr_t grad_z, int dtype, int64_t N, int64_t C,
         int64_t HW, bool nhwc, int act_code, double alpha, uintptr_t grad_bias) {
        py::gil_scoped_release nogil;
        hierfast::cpu::conv_act_backward(ptr<const void>(grad_y), ptr<const void>(saved),
                                         ptr<void>(grad_z), DType(dtype), N, C, HW, nhwc, act_code,
                                         alpha, ptr<double>(grad_bias));
      },
      py::arg("grad_y"), py::arg("saved"), py::arg("grad_z"), py::arg("dtype"), py::arg("N"),
      py::arg("C"), py::arg("HW"), py::arg("nhwc"), py::arg("act_code"), py::arg("alpha"),
      py::arg("grad_bias"));
  m.def(
      "knn2",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t s0, int64_t s1, uintptr_t r1sq,
         uintptr_t r2sq, uintptr_t idx1, uintptr_t idx2, bool allow_bf16) {
        int64_t stats[3];
        {
          py::gil_scoped_release nogil;
          hierfast::cpu::knn2(ptr<const void>(x), DType(dtype), n, d, s0, s1, ptr<double>(r1sq),
                              ptr<double>(r2sq), ptr<int64_t>(idx1), ptr<int64_t>(idx2), allow_bf16, stats);
        }
        return py::make_tuple(stats[0], stats[1], stats[2]);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("s0"), py::arg("s1"),
      py::arg("r1sq"), py::arg("r2sq"), py::arg("idx1"), py::arg("idx2"), py::arg("allow_bf16"));
  m.def(
      "dw_conv_act_backward",
      [](uintptr_t grad_y, uintptr_t saved, uintptr_t x, uintptr_t w, uintptr_t grad_x, uintptr_t grad_w,
         uintptr_t grad_b, int dtype, std::vector<int64_t> geometry, int act_code, double alpha, bool want_x) {
        if (geometry.size() != 14) throw std::invalid_argument("dw_conv_act_backward: geometry needs 14 values");
        py::gil_scoped_release nogil;
        hierfast::cpu::dw_conv_act_backward(ptr<const void>(grad_y), ptr<const void>(saved), ptr<const void>(x),
                                            ptr<const void>(w), ptr<void>(grad_x), ptr<double>(grad_w),
                                            ptr<double>(grad_b), DType(dtype), geometry.data(), act_code, alpha,
                                            want_x);
      });
  m.def(
      "dw_conv_act_forward",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y, uintptr_t z, uintptr_t stats, int dtype,
         std::vector<int64_t> geometry, int act_code, double alpha) {
        if (geometry.size() != 14) throw std::invalid_argument("dw_conv_act_forward: geometry needs 14 values");
        py::gil_scoped_release nogil;
        hierfast::cpu::dw_conv_act_forward(ptr<const void>(x), ptr<const void>(w), ptr<const void>(bias),
                                           ptr<void>(y), ptr<void>(z), ptr<double>(stats), DType(dtype),
                                           geometry.data(), act_code, alpha);
      });
  m.def(
      "channel_topk",
      [](uintptr_t x, int dtype, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc, int64_t ss,
         int64_t base, int64_t k, int mode, uintptr_t vals, uintptr_t idx, uintptr_t pos, uintptr_t bad) {
        py::gil_scoped_release nogil;
        hierfast::cpu::channel_topk(ptr<const void>(x), DType(dtype), B, C, S, sb, sc, ss, base, k, mode,
                                    ptr<double>(vals), ptr<int64_t>(idx), ptr<int64_t>(pos), ptr<int64_t>(bad));
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("sb"), py::arg("sc"),
      py::arg("ss"), py::arg("base"), py::arg("k"), py::arg("mode"), py::arg("vals"), py::arg("idx"),
      py::arg("pos"), py::arg("bad"));
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  m.attr("compiled_with_openmp") = true;
}
