"""Column-centring of a feature batch: ``x - x.mean(0)``, means accumulated in float64.

The CKA path centres each batch before forming Grams in float32: the Gram of raw
post-ReLU features (large common offset) cancels catastrophically in float32
(DESIGN.md, "Traps"). The kernels fuse the upcast from float16/bfloat16, the
float64 mean and the subtraction into two sweeps with one output allocation.
"""
from __future__ import annotations

import torch

from .. import _dtypes
from .._compile import is_compiling
from ..backends import Op
from ._launch import cpu_kernels, cuda_kernels, cuda_stream, on_device

_IN = _dtypes.FLOAT_DTYPES
_OUT = (torch.float32, torch.float64)
OP = Op("center_columns")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` that ``t``'s elements occupy (strides are never negative in torch)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_no_partial_overlap(src: torch.Tensor, out: torch.Tensor, src_name: str) -> None:
    """Raise unless ``out`` (contiguous, same numel as ``src``) is disjoint from ``src`` or is
    exactly ``src`` in place (same start, dtype and contiguous layout). The kernels read ``src``
    while writing ``out``: any other overlap would feed them values they already overwrote."""
    if src.numel() == 0 or src.device != out.device:
        return
    (a0, a1), (b0, b1) = _span(src), _span(out)
    if a1 <= b0 or b1 <= a0:
        return
    if src.data_ptr() == out.data_ptr() and src.dtype == out.dtype and src.is_contiguous():
        return
    raise ValueError(f"out overlaps {src_name}'s memory without being exactly {src_name} in place (same storage "
                     f"offset, dtype and contiguous layout); pass a separate out (or out=None), or "
                     f"{src_name}.clone()")


def center_columns_reference(x: torch.Tensor, out_dtype: torch.dtype = torch.float64):
    """Plain-torch float64 definition: ``(x - mean, mean)`` with ``out`` in ``out_dtype``."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    return (x64 - mean).to(out_dtype), mean


@OP.register("reference", devices=("cpu", "cuda"), dtypes=_IN)
def _reference(x, out, mean):
    o, m = center_columns_reference(x, out.dtype)
    out.copy_(o)
    mean.copy_(m)


@OP.register("cpu", devices=("cpu",), dtypes=_IN)
def _cpu(x, out, mean):
    cpu_kernels().center_columns(x.data_ptr(), _dtypes.code(x.dtype), x.shape[0], x.shape[1], x.stride(0),
                                 x.stride(1), out.data_ptr(), _dtypes.code(out.dtype), mean.data_ptr())


@OP.register("cuda", devices=("cuda",), dtypes=_IN)
def _cuda(x, out, mean):
    if torch.are_deterministic_algorithms_enabled():
        # the kernel adds block partials of the column sums with float64 atomics, in no fixed
        # order: torch.use_deterministic_algorithms(True) gets torch's reductions instead
        return _reference(x, out, mean)
    with torch.cuda.device(x.device):
        cuda_kernels().center_columns(x.data_ptr(), _dtypes.code(x.dtype), x.shape[0], x.shape[1],
                                      x.stride(0), x.stride(1), out.data_ptr(), _dtypes.code(out.dtype),
                                      mean.data_ptr(), cuda_stream(x))


@OP.register("triton", devices=("cpu", "cuda"), dtypes=_IN)
def _triton(x, out, mean):
    from ..kernels.center import center_columns as kernel

    with on_device(x):
        kernel(x, out, mean)


@torch.library.custom_op("hierfast::center_columns", mutates_args=("out", "mean"))
def _center_columns_op(x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, backend: str | None = None) -> None:
    """torch custom op (DESIGN.md principle 4): dispatch happens inside, per call."""
    OP.select((x, out), backend).fn(x, out, mean)


@_center_columns_op.register_fake
def _(x, out, mean, backend=None):
    return None


def center_columns(x: torch.Tensor, *, out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                   backend: str | None = None):
    """Subtract the column means of a 2-D feature batch.

    Args:
        x: ``(n, d)`` float16/bfloat16/float32/float64 tensor, any strides.
        out_dtype: float32 or float64 (never lower than needed for the Gram).
        out: optional contiguous ``(n, d)`` destination of ``out_dtype`` — reuse one
            across batches: a fresh multi-MB allocation costs more in page faults
            than the kernel itself (measured 4.5 ms vs 3.3 ms at 128 x 32768 fp32).
        backend: force ``"reference" | "cpu" | "cuda" | "triton"``.

    A NaN or inf in a column makes that column's mean non-finite; callers can
    validate input from ``mean`` (d values) instead of a pass over ``x``.

    Returns:
        ``(centred (n, d) contiguous in out_dtype, mean (d,) float64)``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must be a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if x.dtype not in _IN:
        raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if out_dtype not in _OUT:
        raise TypeError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    n, d = x.shape
    if out is None:
        out = torch.empty(n, d, dtype=out_dtype, device=x.device)
    elif out.shape != (n, d) or out.dtype != out_dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous ({n}, {d}) {out_dtype} tensor on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
    else:
        check_no_partial_overlap(x, out, "x")
    mean = torch.empty(d, dtype=torch.float64, device=x.device)
    if is_compiling():
        _center_columns_op(x, out, mean, backend)
    else:
        # Eager calls skip the custom-op wrapper, whose first call imports torch._dynamo
        # (3 s measured); the op stays registered for torch.compile / export.
        OP.select((x, out), backend).fn(x, out, mean)
    return out, mean
