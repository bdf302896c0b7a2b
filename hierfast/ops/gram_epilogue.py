"""Gram epilogue: centred or U-centred Gram, its row sums and total, in one op.

Definition (the reference below): for a symmetric Gram ``K`` (n, n)

* biased (``unbiased=False``): ``r_i = sum_j K_ij``, ``t = sum_i r_i``,
  ``out = K - r/n - r^T/n + t/n^2``  (= H K H, Kornblith et al. 2019);
* unbiased: ``K~ = K`` with a zero diagonal, ``r``, ``t`` of ``K~``,
  ``out_ij = K~_ij - r_i/(n-2) - r_j/(n-2) + t/((n-1)(n-2))``, ``out_ii = 0``
  (U-centring, Szekely & Rizzo 2014; <Ku, Lu>/(n(n-3)) is the unbiased HSIC of
  Song et al. 2012).

``out`` may be a row of the caller's stacked (L, n*n) matrix: the kernels write
there directly, which is what makes all-pairs CKA one GEMM (DESIGN.md).
"""
from __future__ import annotations

import torch

from .. import _dtypes
from .._compile import is_compiling
from ..backends import Op
from .center import check_no_partial_overlap
from ._launch import cpu_kernels, cuda_kernels, cuda_stream, on_device

_IN = (torch.float32, torch.float64)
OP = Op("gram_epilogue")


def gram_epilogue_reference(gram: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch float64 definition. Returns ``(out (n, n), rowsum (n,), total ())`` in float64."""
    k = gram.to(torch.float64).clone()
    n = k.shape[0]
    if unbiased:
        k.fill_diagonal_(0.0)
    r = k.sum(dim=1)
    t = r.sum()
    if unbiased:
        out = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + t / ((n - 1) * (n - 2))
        out.fill_diagonal_(0.0)
    else:
        out = k - r[:, None] / n - r[None, :] / n + t / (n * n)
    return out, r, t


@OP.register("reference", devices=("cpu", "cuda"), dtypes=_IN)
def _reference(gram, out, rowsum, total, *, unbiased):
    o, r, t = gram_epilogue_reference(gram, unbiased)
    out.view(o.shape).copy_(o)
    rowsum.copy_(r)
    total.copy_(t.reshape(1))


@OP.register("cpu", devices=("cpu",), dtypes=_IN)
def _cpu(gram, out, rowsum, total, *, unbiased):
    cpu_kernels().gram_epilogue(gram.data_ptr(), _dtypes.code(gram.dtype), gram.shape[0], gram.stride(0),
                                gram.stride(1), out.data_ptr(), _dtypes.code(out.dtype), rowsum.data_ptr(),
                                total.data_ptr(), unbiased)


@OP.register("cuda", devices=("cuda",), dtypes=_IN)
def _cuda(gram, out, rowsum, total, *, unbiased):
    with torch.cuda.device(gram.device):
        cuda_kernels().gram_epilogue(gram.data_ptr(), _dtypes.code(gram.dtype), gram.shape[0], gram.stride(0),
                                     gram.stride(1), out.data_ptr(), _dtypes.code(out.dtype),
                                     rowsum.data_ptr(), total.data_ptr(), unbiased, cuda_stream(gram))


@OP.register("triton", devices=("cpu", "cuda"), dtypes=_IN)
def _triton(gram, out, rowsum, total, *, unbiased):
    from ..kernels.gram_epilogue import gram_epilogue as kernel

    with on_device(gram):
        kernel(gram, out, rowsum, total, unbiased)


@torch.library.custom_op("hierfast::gram_epilogue", mutates_args=("out", "rowsum", "total"))
def _gram_epilogue_op(gram: torch.Tensor, out: torch.Tensor, rowsum: torch.Tensor, total: torch.Tensor,
                      unbiased: bool, backend: str | None = None) -> None:
    """torch custom op (DESIGN.md principle 4): dispatch happens inside, per call."""
    OP.select((gram, out), backend).fn(gram, out, rowsum, total, unbiased=unbiased)


@_gram_epilogue_op.register_fake
def _(gram, out, rowsum, total, unbiased, backend=None):
    return None


def _check(gram: torch.Tensor, out: torch.Tensor | None, unbiased: bool) -> None:
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {tuple(gram.shape)}")
    if gram.dtype not in _IN:
        raise TypeError(f"gram must be float32 or float64, got {gram.dtype}; compute the Gram in float32 or higher")
    n = gram.shape[0]
    if n < (4 if unbiased else 1):
        raise ValueError(f"gram is {n}x{n}; U-centring (unbiased=True) needs n >= 4 samples" if unbiased
                         else "gram is empty")
    if out is not None:
        if out.device != gram.device:
            raise ValueError(f"out is on {out.device} but gram is on {gram.device}")
        if out.numel() != n * n or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of n*n = {n * n} elements, got shape "
                             f"{tuple(out.shape)} (contiguous={out.is_contiguous()})")
        if out.dtype not in _IN:
            raise TypeError(f"out must be float32 or float64, got {out.dtype}")
        check_no_partial_overlap(gram, out, "gram")


def gram_epilogue(gram: torch.Tensor, *, unbiased: bool, out: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float64, backend: str | None = None):
    """Centre (``unbiased=False``) or U-centre (``unbiased=True``) a Gram matrix.

    Args:
        gram: symmetric ``(n, n)`` float32/float64 Gram, any strides.
        unbiased: U-centring (zero diagonal) for the unbiased HSIC; else H K H.
        out: optional contiguous destination of ``n*n`` elements (e.g. ``F[l]`` of a
            stacked ``(L, n*n)`` matrix); allocated with ``out_dtype`` when omitted.
        backend: force ``"reference" | "cpu" | "cuda" | "triton"``.

    Returns:
        ``(out viewed as (n, n), rowsum (n,) float64, total () float64)``; row sums
        and total are of K (diagonal excluded when ``unbiased``).

    Example:
        >>> import torch, hierfast.ops as ops
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> ku, r, t = ops.gram_epilogue(x @ x.T, unbiased=True)
        >>> bool(torch.allclose(ku.sum(0), torch.zeros(6, dtype=torch.float64), atol=1e-12))
        True
    """
    _check(gram, out, unbiased)
    n = gram.shape[0]
    if out is None:
        out = torch.empty(n * n, dtype=out_dtype, device=gram.device)
    rowsum = torch.empty(n, dtype=torch.float64, device=gram.device)
    total = torch.empty(1, dtype=torch.float64, device=gram.device)
    if is_compiling():
        _gram_epilogue_op(gram, out, rowsum, total, unbiased, backend)
    else:
        # Eager calls skip the custom-op wrapper, whose first call imports torch._dynamo
        # (3 s measured); the op stays registered for torch.compile / export.
        OP.select((gram, out), backend).fn(gram, out, rowsum, total, unbiased=unbiased)
    return out.view(n, n), rowsum, total.reshape(())
