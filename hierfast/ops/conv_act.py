"""Fused 2-D convolution + bias + activation, forward and backward, over backends.

Definition (``reference``): ``y = act(conv2d(x, w) + b)`` with symmetric explicit
padding (the functional layer turns "same"/asymmetric padding into ``F.pad``).

* ``cpu``: inference in float32/bfloat16 on layers large enough (:func:`_onednn_pays`): oneDNN's
  fused post-op convolution (``torch.ops.mkldnn._convolution_pointwise``, see :func:`_onednn_ok`),
  reordering the weight on every call unless inside :func:`frozen_weights` (opt-in reuse).
  Training and the rest: torch's convolution without bias, then ONE C++/OpenMP pass adding the
  bias and applying the activation in place (``hierfast._C.conv_act_forward``; y and the saved
  pre-activation of a smooth activation in one pass; the identity activation needs no pass).
  (Training small layers does not reach this module: :func:`eager_training_pays`, they run
  torch's own ops.) Depthwise float32 channels_last layers where it measured faster
  (:func:`_depthwise_forward_wins`) run our fused depthwise forward instead
  (``hierfast._C.dw_conv_act_forward``: conv, bias, activation, the saved pre-activation and
  the statistics tap in one pass). Caveat: oneDNN's ReLU family maps a
  NaN input to 0 where torch (and our kernels) propagate it.
* ``cuda``: torch's (cuDNN) convolution, then the CUDA epilogue kernel in place.
  On CUDA tensors the registry tries ``cuda`` before ``triton``: the Triton kernels
  have only run under the interpreter so far (no GPU measurements yet), so the
  cuDNN path stays the default until a GPU benchmark says otherwise.
* ``triton``: an implicit-GEMM NHWC convolution (depthwise: a direct kernel) with bias
  and activation in the epilogue (hierfast/kernels/conv_act.py).

Backward (every backend): ``grad_z = grad_y * act'(saved)`` fused with the bias
gradient (one pass; the identity passes grad_y through), then ``aten.convolution_backward``
for input and weight. CPU depthwise float32/bfloat16 channels_last layers: all of it in one
fused pass (``hierfast._C.dw_conv_act_backward``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

import torch
import torch.utils.weak

from .. import _dtypes
from ..backends import Op, forced_backend
from . import activations as A
from ._launch import cpu_kernels, cuda_kernels, cuda_stream, on_device

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FORWARD = Op("conv2d_act")
ACT_GRAD = Op("conv2d_act_grad")


class ConvArgs(tuple):
    """(stride, padding, dilation, groups) with 2-tuples of ints."""

    __slots__ = ()

    def __new__(cls, stride, padding, dilation, groups):
        return super().__new__(cls, (tuple(stride), tuple(padding), tuple(dilation), int(groups)))

    stride = property(lambda s: s[0])
    padding = property(lambda s: s[1])
    dilation = property(lambda s: s[2])
    groups = property(lambda s: s[3])


def _conv(x, w, b, p: ConvArgs):
    # torch.convolution, not torch.ops.aten.convolution: the same aten op, with 3.4 us less
    # Python dispatch per call (6.4 against 9.8 us for a 16-channel 4x4 layer)
    return torch.convolution(x, w, b, p.stride, p.padding, p.dilation, False, (0, 0), p.groups)


def _layout(z: torch.Tensor):
    """(tensor in NCHW or NHWC dense order, nhwc flag)."""
    if z.is_contiguous():
        return z, False
    if z.is_contiguous(memory_format=torch.channels_last):
        return z, True
    return z.contiguous(), False


# --------------------------------------------------------------------------- forward impls
# Each returns (y, saved): saved is y or z per act.grad_from_output, None when not keep.

@FORWARD.register("reference", devices=("cpu", "cuda"), dtypes=_FLOATS)
def _fwd_reference(x, w, b, p, act, keep, stats):
    z = _conv(x, w, b, p)
    y = A.apply(z, act)
    if stats is not None:
        _stats_reference(y, stats)
    saved = (y if act.grad_from_output else z) if keep else None
    return y, saved


def _stats_reference(y, stats):
    yd = y.detach().to(torch.float64).transpose(0, 1).reshape(y.shape[1], -1)
    stats[:, 0] += yd.sum(1)
    stats[:, 1] += (yd * yd).sum(1)
    stats[:, 2] += (yd > 0).sum(1).to(torch.float64)


# Where oneDNN's post-op convolution pays in inference, by layer size (`benchmarks/small_layers.py
# paths`, N = 1, channels_last, 2 threads, 2026-12-02: 3x3 and 1x1 layers of 16-512 channels at
# 4-28 px, ReLU and GELU, against torch's convolution + our epilogue; training never takes it, see
# _fwd_cpu). Its call costs ~24 us however small the layer (torch's conv + epilogue: ~7 us), but
# past a size torch's own convolution is the slower one (N = 1 3x3 256 @7: 464 against 268 us).
# oneDNN where the output has >= 20 K elements or the convolution >= 2 M multiply-adds with the
# blocked weight kept (channels_last input inside frozen_weights), >= 5 M when oneDNN reorders the
# weight on every call (the default, and NCHW input):
# * kept weight: epilogue / oneDNN time 0.2-0.7 below both limits (3x3 32 @8 15 vs 26 us, 1x1 64 @16
#   21-26 vs 28-30 us), 0.9-2.8 above (3x3 64 @14 52 vs 96 us); nearest misses 3x3 64 @8 (2.4 M)
#   0.92-1.03, 3x3 16 @28 (1.8 M) 1.22-1.30.
# * reordered weight (timed as forward calls, channels_last): 0.16-0.9 below (1x1 64 @16 26 vs 49
#   us, 1x1 512 @4 93 vs 197 us), mostly 0.9-1.7 above (3x3 64 @14 83.6 vs 109 us, 256 @7 268 vs
#   464 us); parity (0.9-1.1) on the large layers.
# * a weight reordered on every call (outside frozen_weights) also costs its DRAM traffic once a
#   whole network's weights no longer fit the cache, which forward-only timings of one layer hide:
#   fused ResNet-18 inference (benchmarks/resnet_inference.py, channels_last, 2026-12-02) ran 0.81x
#   eager at N = 1, 112 px with the limits above and 0.98x with torch's convolution + our epilogue
#   everywhere. Outside frozen_weights oneDNN therefore also needs an output of >= 8 x the weight's
#   elements: the stem (N = 8: 680x) and 1x1 64->256 @56 (390x) keep its post-op (1.24x / 1.42x
#   eager, against 1.09x / 1.18x with the epilogue); ResNet-18's 3x3 layers at N = 1 (0.1-5x) do not.
_ONEDNN_MIN_OUTPUT = 20000
_ONEDNN_MIN_OUTPUT_PER_WEIGHT = 8
_ONEDNN_MIN_MACS_KEPT, _ONEDNN_MIN_MACS_REORDERED = 2_000_000, 5_000_000


@functools.lru_cache(maxsize=None)
def _mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def _onednn_ok(x, act) -> bool:
    """oneDNN's fused post-op convolution can run this call (float32/bfloat16, an activation
    it has as a post-op: not Mish). Measured on a 2-core x86 CPU (fp32 channels_last, all 7
    layers of benchmarks/bench_conv.py): in inference it is as fast as torch's conv alone, so
    it serves inference on layers above the size limits of :func:`_onednn_pays` (statistics
    taps then read its output once more)."""
    return x.dtype in (torch.float32, torch.bfloat16) and A.onednn_attr(act) is not None and _mkldnn_available()


def _onednn(x, w, b, p, act, *, reuse_weight=False):
    """oneDNN's post-op convolution. ``reuse_weight`` (inference): use, and keep for ``w``, oneDNN's
    blocked copy of the weight for this input shape, while ``w`` is unchanged."""
    attr, scalars, algo = A.onednn_attr(act)
    wk = _packed_weight(x, w, p) if reuse_weight else w
    return torch.ops.mkldnn._convolution_pointwise(x, wk, b, list(p.padding), list(p.stride), list(p.dilation),
                                                   p.groups, attr, scalars, algo)


# weight tensor -> (key, oneDNN-blocked copy); weak and by identity: a copy lives as long as its
# weight (or the frozen_weights block), and nothing is attached to the tensor (a packed tensor in
# its __dict__ made torch.save of the module fail: oneDNN tensors have no storage)
_PACKED_WEIGHTS = torch.utils.weak.WeakIdKeyDictionary()
# inside frozen_weights(): the caller promises that weights change only in ways their version
# counter records
_FROZEN = contextvars.ContextVar("hierfast_frozen_weights", default=False)
# frozen_weights() blocks open in any thread: _PACKED_WEIGHTS is process-wide, so it is cleared
# only when the last one exits (a worker thread's own block is "outermost" in its context)
_ACTIVE_BLOCKS = 0
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen_weights():
    """Opt-in: inside this block, CPU inference keeps oneDNN's blocked copy of each weight
    between calls instead of reordering it on every call (fused ResNet-18, 224 px, channels_last,
    2 threads, 2026-12-02, three interleaved runs: 1.34-1.46x at N = 1, 1.05-1.09x at N = 8; a
    3x3 64 @14 N = 1 layer 1.16-1.21x; :func:`_packed_weight`).

    The promise made: inside the block, weights change only through ops autograd's version
    counter records (in-place ops on the parameter itself, optimizer steps,
    ``load_state_dict``) or by assigning a new ``.data``. Writes it cannot see give outputs
    of the OLD weight: in place through ``.data`` (``p.data.mul_(m)``, ``nn.init`` on
    ``p.data``, a momentum encoder's update) or through numpy. Validating the copy instead
    (one pass over the weight per call) measured as slow as the reorder it saves. Copies
    are dropped when the last block open in the process exits; wrap the whole inference loop,
    not each call.

    The block applies to the thread (context) that entered it: threads started inside it do
    not inherit it (each enters its own block to reuse copies).
    """
    global _ACTIVE_BLOCKS
    with _ACTIVE_LOCK:
        _ACTIVE_BLOCKS += 1
    token = _FROZEN.set(True)
    try:
        yield
    finally:
        _FROZEN.reset(token)
        with _ACTIVE_LOCK:
            _ACTIVE_BLOCKS -= 1
            if _ACTIVE_BLOCKS == 0:
                _PACKED_WEIGHTS.clear()


def _packed_weight(x, w, p):
    """``w`` reordered once into oneDNN's blocked layout for this input shape (under
    :func:`frozen_weights` only): the post-op convolution otherwise reorders it on every call
    (measured, N = 8, 2 threads: 3x3 256 @14 5.00 -> 4.63 ms, 128 @28 4.40 -> 4.29, 64 @56
    4.81 -> 4.74; N = 1, 64 @14: 127 -> 88 us). Keyed on the weight's storage, version counter,
    layout and the input shape, so an in-place update (optimizer step, load_state_dict), a new
    ``.data`` or another batch size repacks; writes that bypass the version counter do not
    (hence opt-in). At most one copy per weight. Tensors without a version counter
    (inference-mode tensors) are not cached."""
    try:
        key = (w._version, w.data_ptr(), w.shape, w.stride(), w.dtype, x.shape, x.dtype, p)
    except RuntimeError:  # inference tensors track no version
        return w
    cached = _PACKED_WEIGHTS.get(w)
    if cached is not None and cached[0] == key:
        return cached[1]
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, list(p.padding), list(p.stride), list(p.dilation),
                                                          p.groups, list(x.shape))
    _PACKED_WEIGHTS[w] = (key, packed)
    return packed


def _epilogue_forward(x, w, b, p, act, keep, stats, run):
    if act.code == A.IDENTITY and stats is None:
        # nothing to apply: the convolution adds the bias itself, no second pass over the output
        # (ResNet-18 with `fuse` has 11 such layers: BN folded, no activation before the add)
        y = _conv(x, w, b, p)
        return y, (y if keep else None)
    if x.dtype in (torch.float16, torch.bfloat16):
        # The convolution adds the bias inside its float32 accumulation: rounding conv(x, w) to
        # 8 or 11 bits first and adding b afterwards loses the small pre-activations that sit
        # near -b (a bfloat16 ReLU layer then flipped 0.1 % of its gradient mask: gradients
        # 35x torch's own bfloat16 error; tests/test_nn_depthwise_backward.py).
        z, b = _conv(x, w, b, p), None
    else:
        z = _conv(x, w, None, p)
    z, nhwc = _layout(z)
    n, c = z.shape[0], z.shape[1]
    hw = z.shape[2] * z.shape[3]
    if b is not None:
        b = b.contiguous()
    # In place unless z must survive as the saved pre-activation.
    y = torch.empty_like(z) if keep and not act.grad_from_output else z
    run(z, y, n, c, hw, nhwc, b, stats)
    saved = (y if act.grad_from_output else z) if keep else None
    return y, saved


def _output_numel(x, w, p: ConvArgs) -> int:
    """Elements of the convolution's output (x: N x C x H x W, as conv2d_act passes it)."""
    oh, ow = _output_size(x, w, p)
    return x.shape[0] * w.shape[0] * max(oh, 0) * max(ow, 0)


def _output_size(x, w, p: ConvArgs):
    """(OH, OW) of the convolution (x: N x C x H x W)."""
    (sh, sw), (ph, pw), (dh, dw) = p[0], p[1], p[2]
    return ((x.shape[2] + 2 * ph - dh * (w.shape[2] - 1) - 1) // sh + 1,
            (x.shape[3] + 2 * pw - dw * (w.shape[3] - 1) - 1) // sw + 1)


def _depthwise_shape_ok(x, w, p: ConvArgs) -> bool:
    """What both fused depthwise kernels need of the layer: 4-D channels_last input, one filter
    per channel, channels a multiple of 16 (whole 512-bit vectors), a square 3x3 or 5x5 filter."""
    return (x.dim() == 4 and p.groups == x.shape[1] == w.shape[0] and w.shape[1] == 1 and x.shape[1] % 16 == 0
            and w.shape[2] == w.shape[3] and w.shape[2] in (3, 5)
            and x.is_contiguous(memory_format=torch.channels_last))


def _depthwise_forward_ok(x, w, b, p: ConvArgs, act) -> bool:
    """The fused CPU depthwise forward (csrc/cpu/dw_conv_forward.cpp) can run this call
    (:func:`_depthwise_shape_ok`, float32; any stride, padding, dilation) and is the faster
    choice for it."""
    if not (x.dtype == w.dtype == torch.float32 and (b is None or b.dtype == torch.float32)
            and _depthwise_shape_ok(x, w, p)):
        return False
    oh, ow = _output_size(x, w, p)
    return min(oh, ow) >= 1 and _depthwise_forward_wins(ow, w.shape[2], p, act)


def _depthwise_forward_wins(ow, k, p: ConvArgs, act) -> bool:
    """Where the fused depthwise forward beats what ``_fwd_cpu`` ran otherwise when this was
    measured (oneDNN's fused post-op convolution, a statistics tap then reading its output once
    more; training a smooth activation: oneDNN's convolution, then our epilogue for y, where
    training now takes torch's convolution + our epilogue; Mish: torch's convolution and our
    epilogue), by measurement: ``benchmarks/dw_forward.py``, 2-core Zen 5, 2 threads,
    2026-12-01, at least two runs per cell (this VM's run-to-run spread is +-30 %, so only what
    held in every run counts):

    * 3x3, stride 1, output rows of >= 28 px (N = 8 and 1, 32-144 channels at 56-112 px):
      ReLU 1.03-1.22x (after the shared-load inner loop), ReLU6, SiLU, Hardswish, sigmoid, tanh,
      Mish 1.1-1.9x in inference and training, GELU 1.14-1.29x in inference and 1.3-1.7x in
      training (y and the saved z in one pass); statistics taps 1.3-1.9x.
    * 5x5, stride 2, or small images (576 channels at 14 px): not ours (0.5-1.25x, slower in
      some runs).

    Those inference figures predate the reuse of oneDNN's blocked weight (_packed_weight).
    Against the reusing path (three more runs): ReLU 0.92-1.56x, SiLU 1.35-1.76x, GELU
    0.88-1.14x, i.e. parity for GELU inference; the choice was left as it is.
    """
    return k == 3 and tuple(p.stride) == (1, 1) and ow >= 28


def _dw_geometry(x, w, p: ConvArgs, oh, ow) -> list:
    """The 14 values both fused depthwise kernels take (csrc/include/hierfast/depthwise.h)."""
    n, c, h, wd = x.shape
    return [n, c, h, wd, oh, ow, w.shape[2], w.shape[3], *p.stride, *p.padding, *p.dilation]


def _depthwise_forward_cpu(x, w, b, p: ConvArgs, act, keep, stats):
    """``(y, saved)`` of the fused depthwise forward: y (and z, when training a smooth activation
    needs it saved) written in one pass, ``stats`` (C x 3 float64) added to on the way."""
    oh, ow = _output_size(x, w, p)
    y = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, memory_format=torch.channels_last)
    z = torch.empty_like(y) if keep and not act.grad_from_output else None
    wc = w.contiguous()
    bc = None if b is None else b.contiguous()
    geometry = _dw_geometry(x, w, p, oh, ow)
    cpu_kernels().dw_conv_act_forward(x.data_ptr(), wc.data_ptr(), 0 if bc is None else bc.data_ptr(), y.data_ptr(),
                                      0 if z is None else z.data_ptr(), 0 if stats is None else stats.data_ptr(),
                                      _dtypes.code(x.dtype), geometry, act.code, act.alpha)
    saved = (y if act.grad_from_output else z) if keep else None
    return y, saved


def _cpu_epilogue(act):
    """``run(z, y, n, c, hw, nhwc, b, stats)`` for :func:`_epilogue_forward`: the C++ pass
    y = act(z + b) (in place when y is z), statistics of y added to ``stats`` when given."""
    def run(z, y, n, c, hw, nhwc, b, stats):
        cpu_kernels().conv_act_forward(z.data_ptr(), y.data_ptr(), _dtypes.code(z.dtype), n, c, hw, nhwc,
                                       0 if b is None else b.data_ptr(), act.code, act.alpha,
                                       0 if stats is None else stats.data_ptr())
    return run


def _cpu_stats(y, stats):
    """Add y's per-channel [sum, sum of squares, count > 0] to ``stats`` (C x 3 float64), reading
    y once (hierfast._C.conv_act_stats)."""
    yl, nhwc = _layout(y)
    cpu_kernels().conv_act_stats(yl.data_ptr(), _dtypes.code(yl.dtype), yl.shape[0], yl.shape[1],
                                 yl.shape[2] * yl.shape[3], nhwc, stats.data_ptr())


# Training a CPU layer with fewer outputs than these runs torch's own convolution and activation
# (two native autograd nodes) instead of the fused op: below them the fused op's fixed cost per
# layer and step (~40-50 us: the Python autograd Function, ~25 us, and its wrappers) outweighs
# the pass it saves. `benchmarks/small_layers.py train relu|gelu`: whole training steps,
# interleaved, 2 threads, 2026-12-02, eager / fused-op time:
# * ReLU (torch's ReLU is as fast as our epilogue): 12.5-50 K outputs 0.78-0.86, 1x1 16 K 0.58,
#   100-800 K 0.88-0.95 (1x1 64 @56 N = 2 0.99); bench_conv's N = 8 layers: 800 K 0.99-1.01,
#   1.6 M and up 1.05-1.28. Limit 1 M; the same for the other activations whose derivative is
#   taken from y, and for the identity.
# * GELU (ours 1.5x faster than torch's): 12.5-50 K 0.77-0.84, 1x1 16 K 0.61, 100-800 K 0.90-1.05
#   (mostly 0.96-0.99); N = 8: 400 K 0.98, 800 K 1.02, 1.6 M 1.11. Limit 100 K for the smooth
#   activations (SiLU, hardswish, Mish, whose kernel is 6.7x torch's, and both GELUs).
# Depthwise layers that the fused depthwise kernels take keep them at every size.
_EAGER_TRAIN_MAX_OUTPUT_FROM_Y, _EAGER_TRAIN_MAX_OUTPUT_SMOOTH = 1_000_000, 100_000


def eager_training_pays(x, w, p: ConvArgs, act) -> bool:
    """Train this layer with torch's own ops (see the limits above): a float32/bfloat16 CPU layer
    below its activation's size limit that no fused depthwise kernel serves."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or _depthwise_shape_ok(x, w, p):
        return False
    limit = _EAGER_TRAIN_MAX_OUTPUT_FROM_Y if act.grad_from_output else _EAGER_TRAIN_MAX_OUTPUT_SMOOTH
    return _output_numel(x, w, p) < limit


def eager_forward(x, w, b, p: ConvArgs, act, stats):
    """``act(conv(x, w) + b)`` with torch's differentiable ops; ``stats`` added to from y."""
    y = A.apply(_conv(x, w, b, p), act)
    if stats is not None:
        _cpu_stats(y.detach(), stats)
    return y


def _onednn_pays(x, w, p: ConvArgs, reuse: bool) -> bool:
    """oneDNN's post-op convolution (with its weight kept when ``reuse``) is the faster choice
    for this layer's size, against torch's convolution + our epilogue (the limits at
    ``_ONEDNN_MIN_OUTPUT``)."""
    numel = _output_numel(x, w, p)
    if not reuse and numel < _ONEDNN_MIN_OUTPUT_PER_WEIGHT * w.numel():
        return False  # the per-call reorder's weight traffic is not small against the output's
    macs = numel * w.shape[1] * w.shape[2] * w.shape[3]
    return numel >= _ONEDNN_MIN_OUTPUT or macs >= (_ONEDNN_MIN_MACS_KEPT if reuse else _ONEDNN_MIN_MACS_REORDERED)


@FORWARD.register("cpu", devices=("cpu",), dtypes=_FLOATS)
def _fwd_cpu(x, w, b, p, act, keep, stats):
    if _depthwise_forward_ok(x, w, b, p, act):
        return _depthwise_forward_cpu(x, w, b, p, act, keep, stats)
    # Training (keep) always takes torch's convolution + our epilogue (y, and z for a smooth
    # activation, in one pass): timed as whole training steps (forward + backward, 2026-12-02), a
    # oneDNN forward, which reorders the weight on every call, was never faster: parity on the
    # N = 8 layers of bench_conv (0.99-1.03), 3-23 % slower on N = 1 layers (3x3 512 @4 5.6 against
    # 4.3 ms, 1x1 64 @16 229 against 175 us; forward-only timings had favoured it: the reorder's
    # traffic shows only once a backward has evicted the weight from cache).
    if not keep and _onednn_ok(x, act):
        # reuse only when asked (frozen_weights): a write through .data or numpy does not bump
        # the version counter the cache is keyed on. A reused (blocked) weight makes oneDNN write
        # channels_last: only for channels_last input, so y keeps torch's memory format
        reuse = _FROZEN.get() and x.is_contiguous(memory_format=torch.channels_last)
        if _onednn_pays(x, w, p, reuse):
            # y = act(conv + b) in one oneDNN primitive. A statistics tap reads y once more:
            # measured cheaper than torch's convolution + our epilogue with the tap (which reads
            # and writes the output; 2026-12-01, N = 8: tap / untapped 1.18-1.19 against 1.30-1.32
            # on the stem, 1.32-1.35 against 1.56-1.58 on a 1x1 64->256).
            y = _onednn(x, w, b, p, act, reuse_weight=reuse)
            if stats is not None:
                _cpu_stats(y, stats)
            return y, None
    return _epilogue_forward(x, w, b, p, act, keep, stats, _cpu_epilogue(act))


def _atomics_allowed() -> bool:
    """The CUDA and Triton kernels' per-channel sums (statistics, bias gradient) add block
    partials with float64 atomics, in no fixed order; under ``torch.use_deterministic_algorithms(True)`` torch's
    own reductions take their place (one more read of the tensor)."""
    return not torch.are_deterministic_algorithms_enabled()


@FORWARD.register("cuda", devices=("cuda",), dtypes=_FLOATS)
def _fwd_cuda(x, w, b, p, act, keep, stats):
    def run(z, y, n, c, hw, nhwc, b, stats):
        tap = stats if _atomics_allowed() else None
        with torch.cuda.device(z.device):
            cuda_kernels().conv_act_forward(z.data_ptr(), y.data_ptr(), _dtypes.code(z.dtype), n, c, hw, nhwc,
                                            0 if b is None else b.data_ptr(), act.code, act.alpha,
                                            0 if tap is None else tap.data_ptr(), cuda_stream(z))
        if stats is not None and tap is None:
            _stats_reference(y, stats)
    return _epilogue_forward(x, w, b, p, act, keep, stats, run)


def _triton_reasons(x, w, *rest):
    return [] if x.dim() == 4 and w.dim() == 4 else ["takes 4-D input and weight"]


@FORWARD.register("triton", devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                  reasons=_triton_reasons)
def _fwd_triton(x, w, b, p, act, keep, stats):
    from ..kernels.conv_act import conv2d_act_triton

    # one kernel: y, the pre-activation z when backward needs it, and the statistics tap
    tap = stats if _atomics_allowed() else None
    with on_device(x):
        y, z, untapped = conv2d_act_triton(x, w, b, p.stride, p.padding, p.dilation, p.groups, act.code,
                                           act.alpha, keep_z=keep and not act.grad_from_output, stats=tap)
    if stats is not None and (tap is None or untapped is not None):
        _stats_reference(y, stats)
    saved = (y if act.grad_from_output else z) if keep else None
    return y, saved


# --------------------------------------------------------------------------- activation grad impls
# (grad_y, saved, act, want_bias) -> (grad_z, grad_bias float64 (C,) or None); backward() itself
# serves the identity activation (grad_z = grad_y)

@ACT_GRAD.register("reference", devices=("cpu", "cuda"), dtypes=_FLOATS)
def _grad_reference(gy, saved, act, want_bias):
    gz = gy * A.derivative(saved, act)
    gb = gz.to(torch.float64).sum((0, 2, 3)) if want_bias else None
    return gz, gb


def _epilogue_grad(gy, saved, act, want_bias, run):
    saved, nhwc = _layout(saved)
    gy = gy.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    gz = torch.empty_like(saved)
    n, c = saved.shape[0], saved.shape[1]
    gb = torch.zeros(c, dtype=torch.float64, device=saved.device) if want_bias else None
    run(gy, saved, gz, n, c, saved.shape[2] * saved.shape[3], nhwc, gb)
    return gz, gb


@ACT_GRAD.register("cpu", devices=("cpu",), dtypes=_FLOATS)
def _grad_cpu(gy, saved, act, want_bias):
    def run(gy, s, gz, n, c, hw, nhwc, gb):
        cpu_kernels().conv_act_backward(gy.data_ptr(), s.data_ptr(), gz.data_ptr(), _dtypes.code(s.dtype), n, c,
                                        hw, nhwc, act.code, act.alpha, 0 if gb is None else gb.data_ptr())
    return _epilogue_grad(gy, saved, act, want_bias, run)


@ACT_GRAD.register("cuda", devices=("cuda",), dtypes=_FLOATS)
def _grad_cuda(gy, saved, act, want_bias):
    def run(gy, s, gz, n, c, hw, nhwc, gb):
        with torch.cuda.device(s.device):
            cuda_kernels().conv_act_backward(gy.data_ptr(), s.data_ptr(), gz.data_ptr(), _dtypes.code(s.dtype), n,
                                             c, hw, nhwc, act.code, act.alpha, 0 if gb is None else gb.data_ptr(),
                                             cuda_stream(s))
    if _atomics_allowed():
        return _epilogue_grad(gy, saved, act, want_bias, run)
    gz, _ = _epilogue_grad(gy, saved, act, False, run)
    return gz, (gz.sum((0, 2, 3), dtype=torch.float64) if want_bias else None)


# --------------------------------------------------------------------------- entry points
def forward(x, w, b, p: ConvArgs, act: A.Activation, *, keep: bool = False, stats=None, backend=None):
    """``(y, saved)``; ``saved`` (what backward needs besides x, w) only when ``keep``."""
    impl = FORWARD.select((x, w) if b is None else (x, w, b), backend)
    return impl.fn(x, w, b, p, act, keep, stats)


def _depthwise_fusable(gy, x, w, saved, p: ConvArgs) -> bool:
    """The fused CPU depthwise backward (csrc/cpu/dw_conv_backward.cpp) applies:
    :func:`_depthwise_shape_ok`, float32 or bfloat16 tensors of one dtype, any stride
    (MobileNet/EfficientNet's depthwise layers). Anything else keeps the unfused path."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and gy.dtype == w.dtype == saved.dtype == x.dtype and _depthwise_shape_ok(x, w, p)
            and saved.is_contiguous(memory_format=torch.channels_last))


def _depthwise_backward_cpu(gy, x, w, saved, p: ConvArgs, act: A.Activation, want_x: bool):
    """Fused activation + depthwise conv backward (csrc/cpu/dw_conv_backward.cpp): ``(gx, gw, gb)``."""
    gy = gy.contiguous(memory_format=torch.channels_last)
    gx = torch.empty_like(x, memory_format=torch.channels_last) if want_x else None
    gw = torch.empty(w.shape, dtype=torch.float64)
    gb = torch.empty(x.shape[1], dtype=torch.float64)
    geometry = _dw_geometry(x, w, p, gy.shape[2], gy.shape[3])
    wc = w.contiguous()
    cpu_kernels().dw_conv_act_backward(gy.data_ptr(), saved.data_ptr(), x.data_ptr(), wc.data_ptr(),
                                       0 if gx is None else gx.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                       _dtypes.code(x.dtype), geometry, act.code, act.alpha, want_x)
    return gx, gw.to(w.dtype), gb


def backward(gy, x, w, saved, p: ConvArgs, act: A.Activation, mask, *, backend=None):
    """Gradients ``(gx, gw, gb)`` (None where ``mask`` is False) of ``y = act(conv(x, w) + b)``;
    ``saved`` may be None for the identity activation (nothing of y is needed)."""
    want_x, want_w, want_b = mask
    if saved is None:
        saved = gy  # the identity: its derivative (1) reads nothing of it
    # conv2d_act_grad has no Triton implementation: a triton forced by backend= or by
    # HIERFAST_BACKEND (which select() would read again) gets the automatic choice
    if forced_backend(backend) == "triton":
        impl = ACT_GRAD._select((gy, saved), None)
    else:
        impl = ACT_GRAD.select((gy, saved), backend)
    if impl.backend == "cpu" and _depthwise_fusable(gy, x, w, saved, p):
        # one pass instead of activation grad + conv backward (the weight and bias sums come free)
        gx, gw, gb = _depthwise_backward_cpu(gy, x, w, saved, p, act, want_x)
        return gx, (gw if want_w else None), (gb.to(gy.dtype) if want_b else None)
    if act.code == A.IDENTITY:
        # grad_z is grad_y: no pass writing a copy; torch's float32 sum for the bias (pairwise,
        # 2.7x faster than its float64 sum on channels_last, 2026-12-02)
        gz, gb = gy, (gy.sum((0, 2, 3)) if want_b else None)
    else:
        gz, gb = impl.fn(gy, saved, act, want_b)
    gx = gw = None
    if want_x or want_w:
        # bias_sizes given although the bias grad is ours: with None, torch's CPU conv
        # backward measured 1.5x slower (depthwise, stem) on this machine. The bias grad stays
        # ours even for the identity activation (the sum above): asking torch's CPU convolution
        # backward for it measured slower than our pass that wrote grad_z and summed the bias
        # (2026-12-01, N=8 fp32 channels_last: stem 15.1 vs 8.8 ms, 3x3 64@56 13.7 vs 12.0, 1x1
        # 64->256 11.6 vs 8.8)
        gx, gw, _ = torch.ops.aten.convolution_backward(gz, x, w, [w.shape[0]], list(p.stride), list(p.padding),
                                                        list(p.dilation), False, [0, 0], p.groups,
                                                        [want_x, want_w, False])
    return gx, gw, (gb.to(gy.dtype) if gb is not None else None)
