"""hierfast.functional: fused operations with torch.nn.functional-style signatures.

``conv2d_act(x, w, b, ...) == act(F.conv2d(x, w, b, ...))`` computed by a fused
kernel (hierfast/ops/conv_act.py), differentiable, and a torch custom op
(``hierfast::conv2d_act``) under ``torch.compile`` / ``torch.export``.
"""
from __future__ import annotations

import functools
import operator
import sys
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from ._compile import is_compiling
from .backends import forced_backend
from .ops import activations as A
from .ops import conv_act as K

__all__ = ["conv2d_act", "decompositions", "frozen_weights"]

# opt-in reuse of oneDNN's blocked weights in CPU inference (see its docstring)
frozen_weights = K.frozen_weights


# --------------------------------------------------------------------------- argument checks
def _as_int(v) -> int | None:
    """``v`` as a Python int when it is an integer (anything ``operator.index`` takes: numpy's
    integers too, as nn.Conv2d keeps them), never a bool; else None."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":  # numpy's bool
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _pair(v, name: str) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:  # nn.Conv2d's form
        return v
    items = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    ints = [_as_int(i) for i in items]
    if len(ints) in (1, 2) and None not in ints:
        return (ints[0], ints[-1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check(x, w, b):
    for name, t in (("input", x), ("weight", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if b is not None and not isinstance(b, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(b).__name__}")
    if w.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape {tuple(w.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d_act, but got input of size: "
                         f"{list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    for name, t in (("weight", w), ("bias", b)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"Input type ({x.dtype}) and {name} type ({t.dtype}) should be the same; "
                            f"cast one of them, e.g. module.to({x.dtype})")
        if t.device != x.device:
            raise ValueError(f"Input is on {x.device} but {name} is on {t.device}; move them to one device")
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
        raise ValueError(f"bias must have shape ({w.shape[0]},) (one per output channel), got {tuple(b.shape)}")


def _resolve_padding(padding, w_shape, stride, dilation):
    """-> (symmetric padding pair, F.pad amounts or None) as torch's conv2d does."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (as in torch.nn.Conv2d)")
        sym, extra = [], []
        for d, k in zip(dilation, w_shape[2:]):
            total = d * (k - 1)
            left = total // 2
            sym.append(left)
            extra.append(total - 2 * left)
        # Odd total padding: torch pads the extra element on the right/bottom.
        pad = None if not any(extra) else (0, extra[1], 0, extra[0])
        return tuple(sym), pad
    p = _pair(padding, "padding")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return p, None


def _geometry(stride, padding, dilation, groups, w_shape, x_shape):
    """Validated ``(ConvArgs, F.pad amounts or None)`` for an input of shape ``x_shape``
    (N x C x H x W) and a weight of shape ``w_shape``; raises as ``nn.Conv2d`` would."""
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
    groups_int = _as_int(groups)
    if groups_int is None or groups_int < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = groups_int
    cin = x_shape[1]
    if w_shape[0] % groups:
        raise ValueError(f"out_channels ({w_shape[0]}) must be divisible by groups ({groups})")
    if cin != w_shape[1] * groups:
        raise ValueError(f"Given groups={groups}, weight of size {list(w_shape)}, expected input"
                         f"{list(x_shape)} to have {w_shape[1] * groups} channels, but got {cin} channels "
                         "instead")
    pad, extra = _resolve_padding(padding, w_shape, stride, dilation)
    for i in (0, 1):
        eff = dilation[i] * (w_shape[2 + i] - 1) + 1
        size = x_shape[2 + i] + (extra[3 - 2 * i] if extra is not None else 0)
        if size + 2 * pad[i] < eff:
            raise ValueError(f"input spatial size {tuple(x_shape[2:])} (padded by {pad}) is smaller than the "
                             f"dilated kernel size {eff} in dimension {i}")
    return K.ConvArgs(stride, pad, dilation, groups), extra


def _exact(v) -> bool:
    """``v`` is an int, a string or a tuple of ints, by exact type: a cache key that cannot
    confuse ``True`` with ``1`` (they hash and compare equal)."""
    t = type(v)
    return t is int or t is str or (t is tuple and all(type(i) is int for i in v))


# (stride, padding, dilation, groups, weight shape, input shape) -> _geometry(...): validating the
# arguments costs ~8 us a call, as much as a small layer's whole convolution; layers call with
# the same arguments every time. Bounded: cleared when full.
_GEOMETRY: dict = {}


def _cached_geometry(stride, padding, dilation, groups, w_shape, x_shape):
    # not under torch.compile: a dict keyed on the shapes would specialise dynamic shapes (a
    # recompile per input size), and the checks run once per trace anyway
    if is_compiling() or not (_exact(stride) and _exact(padding) and _exact(dilation) and type(groups) is int):
        return _geometry(stride, padding, dilation, groups, w_shape, x_shape)
    key = (stride, padding, dilation, groups, w_shape, x_shape)
    try:
        hit = _GEOMETRY.get(key)
    except TypeError:  # symbolic shapes (make_fx tracing): SymInts do not hash
        return _geometry(*key)
    if hit is None:
        hit = _geometry(*key)
        if len(_GEOMETRY) >= 4096:
            _GEOMETRY.clear()
        _GEOMETRY[key] = hit
    return hit


# --------------------------------------------------------------------------- autograd (eager)
def _differentiable_grads(gy, x, w, b, p, act, mask):
    """``(gx, gw, gb)`` (None where ``mask`` is False) of ``act(conv(x, w) + b)`` that autograd can
    differentiate again: the backward of a ``create_graph=True`` call (gradient penalties,
    Hessian-vector products, meta-learning). The layer is recomputed with torch's ops and
    differentiated by autograd; the fused kernels' gradients are plain tensors, which a second
    differentiation would take for constants (silently wrong)."""
    inputs = [t for t, m in zip((x, w, b), mask) if m]
    with torch.enable_grad():
        y = A.apply(K._conv(x, w, b, p), act)
        grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True))
    return tuple(next(grads) if m else None for m in mask)


class _ConvActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, p, act, backend, stats):
        y, saved = K.forward(x, w, b, p, act, keep=True, stats=stats, backend=backend)
        # the identity's backward needs nothing of y: not saved, so that y may be changed in place
        # (a residual `out += identity` after a Conv+BN folded to an identity layer), as after a conv
        ctx.save_for_backward(x, w, b, None if act.code == A.IDENTITY else saved)
        ctx.p, ctx.act, ctx.backend = p, act, backend
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, b, saved = ctx.saved_tensors
        mask = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: these gradients get differentiated too
            return (*_differentiable_grads(gy, x, w, b, ctx.p, ctx.act, mask), None, None, None, None)
        gx, gw, gb = K.backward(gy, x, w, saved, ctx.p, ctx.act, mask, backend=ctx.backend)
        return gx, gw, gb, None, None, None, None


# --------------------------------------------------------------------------- custom op (tracing)
@torch.library.custom_op("hierfast::conv2d_act", mutates_args=())
def _conv2d_act_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int, act: str, act_code: int, alpha: float,
                   keep: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, pre)``; ``pre`` is the pre-activation when backward needs it
    (smooth activations and ``keep``), else an empty tensor."""
    return _op_forward(x, w, b, stride, padding, dilation, groups, act, act_code, alpha, keep)


def _op_forward(x, w, b, stride, padding, dilation, groups, act, act_code, alpha, keep, backend=None):
    """The body of ``hierfast::conv2d_act``; with ``backend="reference"`` (torch's ops) its
    ATen decomposition (:func:`decompositions`)."""
    a = A.Activation(act, act_code, alpha)
    y, saved = K.forward(x, w, b, K.ConvArgs(stride, padding, dilation, groups), a, keep=keep, backend=backend)
    pre = saved if (keep and not a.grad_from_output) else x.new_empty(0)
    return y, pre


@_conv2d_act_op.register_fake
def _(x, w, b, stride, padding, dilation, groups, act, act_code, alpha, keep):
    y = torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, [0, 0], groups)
    a = A.Activation(act, act_code, alpha)
    pre = torch.empty_like(y) if (keep and not a.grad_from_output) else x.new_empty(0)
    return y, pre


@torch.library.custom_op("hierfast::conv2d_act_backward", mutates_args=())
def _conv2d_act_backward_op(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor,
                            stride: List[int], padding: List[int], dilation: List[int], groups: int, act: str,
                            act_code: int, alpha: float, mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    return _op_backward(gy, x, w, saved, stride, padding, dilation, groups, act, act_code, alpha, mask)


def _op_backward(gy, x, w, saved, stride, padding, dilation, groups, act, act_code, alpha, mask, backend=None):
    """The body of ``hierfast::conv2d_act_backward``; with ``backend="reference"`` (torch's ops)
    its ATen decomposition (:func:`decompositions`)."""
    a = A.Activation(act, act_code, alpha)
    gx, gw, gb = K.backward(gy, x, w, saved, K.ConvArgs(stride, padding, dilation, groups), a, mask, backend=backend)
    # custom ops cannot return None: empty placeholders where no gradient was asked for
    return (_like(gx, x) if gx is not None else x.new_empty(0), _like(gw, w) if gw is not None else w.new_empty(0),
            gb if gb is not None else w.new_empty(0))


@_conv2d_act_backward_op.register_fake
def _(gy, x, w, saved, stride, padding, dilation, groups, act, act_code, alpha, mask):
    return (torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(w) if mask[1] else w.new_empty(0),
            w.new_empty(w.shape[0]) if mask[2] else w.new_empty(0))


def _like(g, t):
    """``g`` with ``t``'s strides (torch's conv backward picks layouts its meta kernel
    does not always predict; the fake above promises ``empty_like``)."""
    return g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)


def _setup_context(ctx, inputs, output):
    x, w, b, stride, padding, dilation, groups, act, act_code, alpha, keep = inputs
    y, pre = output
    a = A.Activation(act, act_code, alpha)
    # the identity's backward needs nothing of y (kept out, so that y may be changed in place)
    ctx.save_for_backward(x, w, b, y if a.grad_from_output and a.code != A.IDENTITY else pre)
    ctx.args = (stride, padding, dilation, groups, act, act_code, alpha)
    ctx.has_bias = b is not None


def _backward(ctx, gy, gpre):
    x, w, b, saved = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if torch.is_grad_enabled():  # create_graph=True: these gradients get differentiated too
        stride, padding, dilation, groups, act, act_code, alpha = ctx.args
        grads = _differentiable_grads(gy, x, w, b, K.ConvArgs(stride, padding, dilation, groups),
                                      A.Activation(act, act_code, alpha), mask)
        return (*grads, None, None, None, None, None, None, None, None)
    if ctx.args[5] == A.IDENTITY:
        saved = gy  # read by nothing: the identity's derivative is 1
    elif saved.numel() == 0 and gy.numel() > 0:
        # Called with keep=False yet differentiated: recompute the pre-activation.
        stride, padding, dilation, groups = ctx.args[:4]
        saved = torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False, [0, 0], groups)
    gx, gw, gb = _conv2d_act_backward_op(gy, x, w, saved, *ctx.args, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None, None, None, None)


_conv2d_act_op.register_autograd(_backward, setup_context=_setup_context)


def decompositions() -> dict:
    """``{op: function}`` decomposing hierfast's custom ops (``hierfast::conv2d_act`` and its
    backward) into core ATen ops, for ``ExportedProgram.run_decompositions``: deployments that
    run without Python (AOTInductor, ExecuTorch) cannot call the ops' Python implementations::

        ep = torch.export.export(model, args)
        table = torch.export.default_decompositions()
        table.update(hierfast.functional.decompositions())
        ep = ep.run_decompositions(table)  # aten.convolution + the activation's ATen ops
    """
    return {torch.ops.hierfast.conv2d_act.default: functools.partial(_op_forward, backend="reference"),
            torch.ops.hierfast.conv2d_act_backward.default: functools.partial(_op_backward, backend="reference")}


def _traced(*tensors) -> bool:
    """Being traced (torch.compile, export, make_fx, fake tensors): use the custom op,
    whose fake implementation describes the output. Eager calls skip it (the wrapper
    costs a dispatcher round trip and imports torch._dynamo on first use)."""
    if is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors if t is not None)


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_jit_tracing_state = torch._C._get_tracing_state


def needs_torch_ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Any of x, w, b is a torch.func transform's (vmap, grad, jacrev, jvp, ...) wrapper, or
    forward-mode AD (``torch.autograd.forward_ad.dual_level``), ``torch.jit.trace`` or an ONNX
    export is on: then the layer runs torch's own ops, which these know how to batch,
    differentiate, record and translate (the fused kernels take raw pointers: a forward-mode
    tangent came out as the convolution's alone, with no error; jit.trace failed on oneDNN's
    arguments; ONNX has no translation of the custom op). Called on every eager call: written
    for speed (~0.3 us)."""
    if is_compiling():  # dynamo cannot trace the checks below (and handles the transforms itself)
        return torch.onnx.is_in_onnx_export()  # the dynamo ONNX exporter: torch.export underneath
    return (_forward_ad._current_level >= 0 or _is_wrapped(x) or _is_wrapped(w)
            or (b is not None and _is_wrapped(b)) or _jit_tracing_state() is not None)


# --------------------------------------------------------------------------- autocast
# device type -> has autocast; a plain dict, not functools.lru_cache, which Dynamo warns about
# on every compile of a layer (it traces through the cache wrapper)
_AUTOCAST_AVAILABLE: dict = {}


def _autocast_available(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for device types without autocast ("meta")
    ok = _AUTOCAST_AVAILABLE.get(device_type)
    if ok is None:
        ok = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return ok


def _autocast_on(device_type: str) -> bool:
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# what torch's autocast casts for conv2d: floating-point tensors but float64
_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(t, dt):
    """``t`` in the autocast dtype ``dt`` where torch's autocast would cast it, else as it is."""
    return t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CAST else t


# --------------------------------------------------------------------------- public function
def conv2d_act(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
               dilation=1, groups: int = 1, activation="relu", *, stats: torch.Tensor | None = None,
               backend: str | None = None, **act_kwargs) -> torch.Tensor:
    """``activation(F.conv2d(input, weight, bias, stride, padding, dilation, groups))``, fused.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; contiguous or channels_last;
            float16/bfloat16/float32/float64.
        weight: ``(C_out, C_in/groups, kH, kW)``; bias: ``(C_out,)`` or None (same dtype/device).
        stride, padding, dilation, groups: as ``F.conv2d`` (padding ``"same"``/``"valid"`` too).
        activation: one of ``identity relu relu6 leaky_relu gelu silu hardswish sigmoid tanh
            mish`` (None = identity); ``act_kwargs``: ``negative_slope`` (leaky_relu),
            ``approximate`` ("none"/"tanh", gelu).
        stats: optional ``(C_out, 3)`` float64 tensor on input's device; per-channel sum,
            sum of squares and count of positive outputs are ADDED to it (statistics tap).
        backend: force ``"reference" | "cpu" | "cuda" | "triton"``.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or unbatched), same dtype and memory format as torch's conv.

    Under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...), forward-mode AD,
    ``torch.jit.trace`` and ``torch.onnx.export`` it runs torch's own convolution and activation,
    which these can batch, differentiate, record and translate.

    Paths (automatic backend): the fused op (hierfast/ops/conv_act.py: oneDNN's post-op
    convolution or torch's convolution + one C++ pass, fused depthwise kernels, CUDA epilogue);
    training a CPU layer too small for fusion to pay (fewer outputs than ~1 M, or 100 K for the
    smooth activations; ``ops.conv_act.eager_training_pays``) runs torch's own convolution and
    activation, measured faster there. ``backend=`` always takes the fused op. CPU inference
    reorders the weight for oneDNN on every call; inside :func:`frozen_weights` (opt-in) it keeps
    the reordered copy, for weights that change only in ways autograd's version counter records.
    """
    act = A.resolve(activation, **act_kwargs)
    if isinstance(input, torch.Tensor) and _autocast_on(input.device.type):
        # as F.conv2d under autocast: run in the autocast dtype
        dt = torch.get_autocast_dtype(input.device.type)
        input, weight, bias = (_autocast(t, dt) for t in (input, weight, bias))
    _check(input, weight, bias)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    p, extra = _cached_geometry(stride, padding, dilation, groups, weight.shape, x.shape)
    if extra is not None:
        x = F.pad(x, extra)
    if stats is not None:
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.float64 \
                or tuple(stats.shape) != (weight.shape[0], 3) or stats.device != x.device or not stats.is_contiguous():
            raise ValueError(f"stats must be a contiguous float64 tensor of shape ({weight.shape[0]}, 3) on "
                             f"{x.device}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if x.device.type == "meta":  # shapes only: torch's ops describe the output; no statistics to add
        y = K.eager_forward(x, weight, bias, p, act, None)
    elif needs_torch_ops(x, weight, bias):  # torch.func, forward-mode AD, jit.trace, ONNX export
        if stats is not None:
            raise ValueError("stats taps cannot be used under torch.func transforms (vmap, grad, ...), "
                             "forward-mode AD, torch.jit.trace or ONNX export")
        y = K.eager_forward(x, weight, bias, p, act, None)
    elif _traced(x, weight, bias):
        if stats is not None:
            raise ValueError("stats taps are eager-only; they cannot be used under torch.compile/export")
        y, _ = torch.ops.hierfast.conv2d_act(x, weight, bias, list(p.stride), list(p.padding), list(p.dilation),
                                             p.groups, act.name, act.code, act.alpha, needs_grad)
    elif needs_grad:
        if forced_backend(backend) is None and K.eager_training_pays(x, weight, p, act):
            y = K.eager_forward(x, weight, bias, p, act, stats)  # small layer: torch's own ops are faster
        else:
            y = _ConvActFn.apply(x, weight, bias, p, act, backend, stats)
    else:
        y, _ = K.forward(x, weight, bias, p, act, keep=False, stats=stats, backend=backend)
    return y.squeeze(0) if unbatched else y
