// What the two fused CPU depthwise kernels (csrc/cpu/dw_conv_forward.cpp, dw_conv_backward.cpp)
// share: the task width, the layer geometry they are passed (hierfast/ops/conv_act.py,
// _dw_geometry: 14 int64 values) and its checks.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace hierfast::cpu::dw {

constexpr int kLanes = 16;  // float32 channels per task (one 512-bit vector)

struct Geometry {
  int64_t N, C, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
};

// v: N, C, H, W, OH, OW, KH, KW, stride h/w, padding h/w, dilation h/w. Throws
// std::invalid_argument (prefixed with `what`) unless C is a multiple of 16, the filter a
// square 3x3 or 5x5, stride and dilation >= 1, padding >= 0 (and, with need_output, the
// output at least 1 x 1).
inline Geometry geometry(const int64_t* v, const char* what, bool need_output) {
  const Geometry q{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13]};
  if (q.C % kLanes != 0 || q.KH != q.KW || (q.KH != 3 && q.KH != 5))
    throw std::invalid_argument(std::string(what) + ": needs C % 16 == 0 and a 3x3 or 5x5 filter");
  if (q.sh < 1 || q.sw < 1 || q.dh < 1 || q.dw < 1 || q.ph < 0 || q.pw < 0 || (need_output && (q.OH < 1 || q.OW < 1)))
    throw std::invalid_argument(std::string(what) + ": stride and dilation >= 1, padding >= 0" +
                                (need_output ? ", output >= 1x1" : ""));
  return q;
}

}  // namespace hierfast::cpu::dw
