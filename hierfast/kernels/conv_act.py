"""Triton fused convolution + bias + activation (definition: hierfast/ops/conv_act.py).

* ``_igemm_kernel``: implicit GEMM. Rows M = N*OH*OW output pixels, columns = output
  channels of one group, reduction K = KH*KW*C_in/groups taken channel-fastest, so
  NHWC (channels_last) inputs are read in contiguous runs. fp32 accumulation
  (tf32 tensor cores for fp32 inputs on GPU), bias + activation in the epilogue,
  autotuned over tile sizes on GPU.
* ``_depthwise_kernel``: direct depthwise conv (groups == C_in == C_out): each program
  owns BLOCK_P pixels x BLOCK_C channels and walks the KH x KW taps; autotuned over the
  tile on GPU.

Both take element strides, so contiguous and channels_last inputs work alike; the
output takes the layout torch's convolution would give it. Offsets are 32-bit, the index
type Triton gives them, unless a tensor's offsets reach 2^31 (``WIDE``: 64-bit). Runs on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it; no
autotuning there).
"""
import inspect
import os

import torch
import triton
import triton.language as tl

# Activation codes: hierfast/ops/activations.py
_SQRT1_2 = 0.7071067811865476
_SQRT_2_PI = 0.7978845608028654


@triton.jit
def _activation(z, CODE: tl.constexpr, alpha):
    if CODE == 1:  # relu
        z = tl.where(z < 0, 0.0, z)
    elif CODE == 2:  # relu6
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif CODE == 3:  # leaky_relu
        z = tl.where(z > 0, z, z * alpha)
    elif CODE == 4:  # gelu (erf)
        z = 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif CODE == 5:  # gelu (tanh) = z * sigmoid(2u)
        z = z * tl.sigmoid(2.0 * _SQRT_2_PI * (z + 0.044715 * z * z * z))
    elif CODE == 6:  # silu
        z = z * tl.sigmoid(z)
    elif CODE == 7:  # hardswish
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif CODE == 8:  # sigmoid
        z = tl.sigmoid(z)
    elif CODE == 9:  # tanh
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif CODE == 10:  # mish: z * tanh(softplus(z)) = z * n / (n + 2), n = e^z (e^z + 2)
        e = tl.exp(tl.minimum(z, 20.0))
        n = e * (e + 2.0)
        z = tl.where(z > 20.0, z, z * n / (n + 2.0))
    return z


@triton.jit
def _tap(out, valid, S, ch, mask_ch):
    """Add the tile's per-channel [sum, sum of squares, count > 0] of ``out`` (the values as
    stored, rounded to the output dtype) to ``S`` (C x 3 float64): one atomic per channel and
    statistic per program, not a second pass over the output."""
    o = tl.where(valid, out.to(tl.float64), 0.0)
    tl.atomic_add(S + ch * 3, tl.sum(o, axis=0), mask=mask_ch)
    tl.atomic_add(S + ch * 3 + 1, tl.sum(o * o, axis=0), mask=mask_ch)
    tl.atomic_add(S + ch * 3 + 2, tl.sum(tl.where(o > 0, 1.0, 0.0).to(tl.float64), axis=0), mask=mask_ch)


@triton.jit
def _igemm_kernel(X, W, B, Y, Z, S, M, C_out_g, K, C_in_g, H, Wd, OH, OW,
                  sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, alpha,
                  KW: tl.constexpr, HAS_BIAS: tl.constexpr, CODE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  WIDE: tl.constexpr, STORE_Z: tl.constexpr, STATS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    if WIDE:  # 64-bit offsets: every index below derives from these
        pid_m = pid_m.to(tl.int64)
        g = g.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    mask_m = rm < M
    mask_n = rn < C_out_g
    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    co = g * C_out_g + rn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        if WIDE:
            rk = rk.to(tl.int64)
        ci = rk % C_in_g  # channel fastest (NHWC-contiguous reads)
        tap = rk // C_in_g
        kw = tap % KW
        kh = tap // KW
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        ok = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
        a = tl.load(X + n[:, None] * sxn + (g * C_in_g + ci)[None, :] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
        b = tl.load(W + co[None, :] * swo + ci[:, None] * swi + kh[:, None] * swh + kw[:, None] * sww,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offset = n[:, None] * syn + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    valid = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:  # the pre-activation, which backward needs for a smooth activation (same layout as y)
        tl.store(Z + offset, acc.to(Z.dtype.element_ty), mask=valid)
    out = _activation(acc, CODE, alpha).to(Y.dtype.element_ty)
    tl.store(Y + offset, out, mask=valid)
    if STATS:
        _tap(out, valid, S, co, mask_n)


_IGEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                             (128, 32, 32, 4, 4), (64, 32, 32, 2, 5), (32, 64, 32, 2, 5), (64, 64, 64, 4, 3)]
]
def _autotuned(kernel, configs, key):
    """``kernel`` autotuned over ``configs``. Autotuning runs the kernel many times on the first
    call of a shape, so the statistics tap (which adds to ``S``) is restored after each trial
    (``restore_value``; an older Triton without it gets the tap from torch instead, see
    conv2d_act_triton)."""
    kw = {"restore_value": ["S"]} if _TUNING_RESTORES else {}
    return triton.autotune(configs, key=key, **kw)(kernel)


_TUNING_RESTORES = "restore_value" in inspect.signature(triton.autotune).parameters
# The tuning key: the GEMM's size and what changes its memory access for the same size, the
# filter width (K = C_in_g x KH x KW mixes a 1x1 over many channels with a 3x3 over few), the
# stride and the input's channel stride (1: channels_last; else NCHW, where it is H x W).
_igemm_tuned = _autotuned(_igemm_kernel, _IGEMM_CONFIGS, ["M", "C_out_g", "K", "KW", "stride_w", "sxc"])


@triton.jit
def _depthwise_kernel(X, W, B, Y, Z, S, P, C, H, Wd, OH, OW,
                      sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, alpha,
                      KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, CODE: tl.constexpr,
                      WIDE: tl.constexpr, STORE_Z: tl.constexpr, STATS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    if WIDE:  # 64-bit offsets: every index below derives from these
        pid_p = pid_p.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = rp < P
    mask_c = rc < C
    ow = rp % OW
    oh = (rp // OW) % OH
    n = rp // (OW * OH)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
            x = tl.load(X + (n * sxn + ih * sxh + iw * sxw)[:, None] + rc[None, :] * sxc,
                        mask=ok[:, None] & mask_c[None, :], other=0.0)
            w = tl.load(W + rc * swo + kh * swh + kw * sww, mask=mask_c, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    offset = (n * syn + oh * syh + ow * syw)[:, None] + rc[None, :] * syc
    valid = mask_p[:, None] & mask_c[None, :]
    if STORE_Z:
        tl.store(Z + offset, acc.to(Z.dtype.element_ty), mask=valid)
    out = _activation(acc, CODE, alpha).to(Y.dtype.element_ty)
    tl.store(Y + offset, out, mask=valid)
    if STATS:
        _tap(out, valid, S, rc, mask_c)


# Tensors of this many elements or more take 64-bit offsets (tests lower it to run that path).
_WIDE_AT = 2**31


# Direct depthwise tiles (pixels x channels): channels are the contiguous dimension of an NHWC
# tensor, so BLOCK_C runs are one vector load per pixel and tap; neighbouring pixels share
# their input rows through the cache.
_DEPTHWISE_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=w)
    for bp, bc, w in [(64, 32, 4), (128, 32, 4), (32, 64, 4), (64, 64, 4), (128, 64, 8), (256, 16, 4)]
]
_depthwise_tuned = _autotuned(_depthwise_kernel, _DEPTHWISE_CONFIGS, ["P", "C", "OW", "KH", "KW", "stride_w", "sxc"])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tiles(x: torch.Tensor) -> str:
    """How the kernels get their tiles: ``"small"`` (the interpreter, CPU tensors: 16-wide tiles),
    ``"fixed"`` (one tile; ``HIERFAST_TRITON_AUTOTUNE=0``: autotuning compiles and times every
    config once per new shape, seconds each, which the correctness tests' hundreds of shapes cannot
    afford; tests/conftest.py sets it) or ``"tuned"`` (autotuned, on a GPU)."""
    if _interpreting() or x.device.type != "cuda":
        return "small"
    return "tuned" if os.environ.get("HIERFAST_TRITON_AUTOTUNE", "1") not in ("", "0") else "fixed"


def _channels_last(t: torch.Tensor) -> bool:
    """torch's own test of channels_last strides (c10's is_channels_last_strides_2d, behind
    ``suggest_memory_format``): strides that grow over C, W, H, N. Size-1 dimensions make some
    tensors both layouts; this answers as torch does there (a 1x1 weight of strides (C, 1, C, C)
    is channels_last, one of strides (C, 1, 1, 1) is not)."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < smallest:
            return False
        if d == 0 and smallest == t.stride(1):
            return False
        smallest = t.stride(d) * (t.shape[d] if t.shape[d] > 1 else 1)
    return True


def _span(t: torch.Tensor) -> int:
    """Elements from t's first to its last, + 1: what its offsets reach (a strided view can
    reach past 2^31 with fewer elements)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)


def output_memory_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """The layout torch's convolution gives its output: channels_last when the input or the weight
    is channels_last, else contiguous."""
    return torch.channels_last if _channels_last(x) or _channels_last(w) else torch.contiguous_format


def conv2d_act_triton(x, w, b, stride, padding, dilation, groups: int, code: int, alpha: float, *,
                      keep_z: bool = False, stats: torch.Tensor | None = None):
    """``(y, z, untapped)``: ``y = act(conv2d(x, w, b))`` for 4-D ``x``, of x's dtype in the layout
    torch's convolution would give (:func:`output_memory_format`); ``z`` the pre-activation,
    written in the same pass when ``keep_z`` (else None); per-channel [sum, sum of squares,
    count > 0] of y added to ``stats`` (C_out x 3 float64) in the same pass when given, except
    where an autotuning Triton cannot restore it between trials: then ``untapped`` is ``stats``,
    for the caller to fill from y (else None)."""
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # torch's convolution's output layout (a drop-in: a following view() must work as it did)
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x, w))
    z = torch.empty_like(y) if keep_z else None
    tiles = _tiles(x)
    later_tap = None
    if stats is not None and tiles == "tuned" and not _TUNING_RESTORES:  # trials would add to it many times
        stats, later_tap = None, stats
    bias = b.contiguous() if b is not None else w  # w: a placeholder pointer (as for z, stats), never read
    wide = max(_span(x), _span(w), _span(y)) >= _WIDE_AT
    outs = (y, w if z is None else z, w if stats is None else stats)
    flags = dict(WIDE=wide, STORE_Z=z is not None, STATS=stats is not None)
    common = (*x.stride(), )
    conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(alpha))
    if groups == cin == cout and cin_g == 1:
        p = n * oh * ow
        args = (x, w, bias, *outs, p, cout, h, wd, oh, ow, *common, w.stride(0), w.stride(2), w.stride(3),
                *y.stride(), *conv)
        meta = dict(KH=kh, KW=kw, HAS_BIAS=b is not None, CODE=code, **flags)
        if tiles == "small":
            _depthwise_kernel[(triton.cdiv(p, 16), triton.cdiv(cout, 16))](*args, **meta, BLOCK_P=16, BLOCK_C=16)
        elif tiles == "fixed":
            _depthwise_kernel[(triton.cdiv(p, 64), triton.cdiv(cout, 32))](*args, **meta, BLOCK_P=64, BLOCK_C=32,
                                                                        num_warps=4)
        else:
            grid = lambda META: (triton.cdiv(p, META["BLOCK_P"]), triton.cdiv(cout, META["BLOCK_C"]))  # noqa: E731
            _depthwise_tuned[grid](*args, **meta)
        return y, z, later_tap
    m, cout_g, k = n * oh * ow, cout // groups, cin_g * kh * kw
    # The weight as O x KH x KW x I (channels_last): the reduction index k = (kh, kw, ci) is then
    # the element offset within a filter, so each B tile loads contiguous runs (O x I x KH x KW
    # strides them by KH*KW: a gather per element). A copy of the weight unless already so (1x1
    # filters always are).
    w = w.contiguous(memory_format=torch.channels_last)
    args = (x, w, bias, *outs, m, cout_g, k, cin_g, h, wd, oh, ow, *common, *w.stride(), *y.stride(), *conv)
    meta = dict(KW=kw, HAS_BIAS=b is not None, CODE=code, UPCAST=x.dtype == torch.bfloat16 and _interpreting(),
                PRECISION="tf32" if x.dtype == torch.float32 and x.is_cuda else "ieee", **flags)
    if tiles == "small":
        grid = (triton.cdiv(m, 16), triton.cdiv(cout_g, 16), groups)
        _igemm_kernel[grid](*args, **meta, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    elif tiles == "fixed":
        grid = (triton.cdiv(m, 64), triton.cdiv(cout_g, 64), groups)
        _igemm_kernel[grid](*args, **meta, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    else:
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), triton.cdiv(cout_g, META["BLOCK_N"]), groups)  # noqa: E731
        _igemm_tuned[grid](*args, **meta)
    return y, z, later_tap
