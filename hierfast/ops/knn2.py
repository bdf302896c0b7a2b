"""Fused pairwise distance + 2-nearest-neighbour search (for TwoNN, Facco et al. 2017).

Definition (:func:`knn2_reference`): for rows x_i of an ``(n, d)`` matrix, the two
smallest squared Euclidean distances ``r1sq_i <= r2sq_i`` to the *other* rows, computed
exactly as ``sum((x_i - x_j)^2)`` in float64, and their indices ``idx1_i, idx2_i``; among
equal distances the lower index comes first. The kernels never store the ``n x n``
distance matrix.

Every backend is exact, in two steps:

1. *Screen* (the fast part): on centred data (distances unchanged, rounding error smaller),
   distances in the input precision keep the :data:`KEEP` nearest candidates per row
   (C++/OpenMP ``csrc/cpu/knn2.cpp``, CUDA ``csrc/cuda/knn2.cu``, Triton
   ``hierfast/kernels/knn2.py``).
2. *Certify* (:func:`certify`; inside the C++ kernel on the CPU): the candidates' exact
   float64 distances are computed; a rigorous bound ``eps_i`` on the screen's rounding error
   proves the two smallest are the true two nearest when the ``KEEP``-th screened value
   minus ``eps_i`` still exceeds the second exact one. Rows without that proof (near ties,
   three or more duplicates) get an exact float64 scan over all rows.
"""
from __future__ import annotations

import torch

from .. import _dtypes
from ..backends import Op
from ._launch import cpu_kernels, cuda_kernels, cuda_stream, on_device

_IN = (torch.float32, torch.float64)
KEEP = 4  # screened candidates per row; with 4, certification fails on ~0 % of rows of real data
OP = Op("knn2")


def knn2_reference(x: torch.Tensor, *, rows: torch.Tensor | None = None, chunk: int | None = None):
    """Plain-torch float64 definition: ``(r1sq, r2sq, idx1, idx2)`` (float64, float64, int64,
    int64), each ``(n,)`` — or ``(len(rows),)`` for the query rows ``rows`` only. Exact
    differences ``sum((x_i - x_j)^2)`` (no expansion, no sqrt), ``chunk`` query rows at a time
    (default: ~16M elements)."""
    x64 = x.to(torch.float64)
    n = x64.shape[0]
    queries = torch.arange(n, device=x.device) if rows is None else rows.to(x.device)
    m = queries.numel()
    chunk = chunk or max(1, (1 << 24) // (n * x64.shape[1]))
    out = [torch.empty(m, dtype=torch.float64, device=x.device) for _ in range(2)] + \
          [torch.empty(m, dtype=torch.int64, device=x.device) for _ in range(2)]
    for s in range(0, m, chunk):
        qi = queries[s:s + chunk]
        d2 = (x64[qi][:, None, :] - x64[None, :, :]).square_().sum(dim=2)
        local = torch.arange(qi.numel(), device=x.device)
        # excluded by index, not by an inf value: overflowed distances are inf too and would
        # tie with the masked self (the row came back as its own neighbour)
        taken = torch.zeros(d2.shape, dtype=torch.bool, device=x.device)
        taken[local, qi] = True
        for k in range(2):
            j = _first_min(d2, taken)
            out[k][s:s + chunk] = d2[local, j]
            out[2 + k][s:s + chunk] = j
            taken[local, j] = True
    return tuple(out)


def _first_min(d2: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest column index of the smallest ``d2`` among columns not ``taken``
    (every row has one: n >= 3)."""
    d = d2.masked_fill(taken, float("inf"))
    hit = (d == d.min(dim=1, keepdim=True).values) & ~taken
    return hit.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index


def _centred(x: torch.Tensor) -> torch.Tensor:
    """``x`` minus its column mean (mean in float64, subtraction in x's precision)."""
    return (x - x.to(torch.float64).mean(dim=0).to(x.dtype)).contiguous()


def screen_error_bound(norms: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Per row, a bound on |screened - true| squared distance to any other row (float64, (n,)).

    For centred rows a, b in a precision with unit roundoff u: centring <= 5u(|a|^2+|b|^2),
    rounded norms <= u(|a|^2+|b|^2), the length-d dot product (any order) <= 1.01 d u |a||b|
    (doubled), the final additions <= 4u(|a|^2+|b|^2); a direct sum of squared differences
    stays below the same total. We use about twice it: (2d + 32) u (|a|^2 + max |b|^2).
    Where products and sums underflow, each of the ~4d + 8 operations errs by up to the
    subnormal spacing, or by a whole flushed value (< the smallest normal) where denormals
    are flushed, as GPU kernels may do: this bound, used to certify GPU screens, takes the
    absolute term (4d + 16) * min normal. The CPU kernel (csrc/cpu/knn2.cpp) uses
    (4d + 16) * denorm_min unless its threads flush (FTZ/DAZ)."""
    fi = torch.finfo(dtype)
    return (2.0 * d + 32.0) * (fi.eps / 2) * (norms + norms.max()) + (4.0 * d + 16.0) * fi.tiny


def certify(x: torch.Tensor, norms: torch.Tensor, cand_d: torch.Tensor, cand_j: torch.Tensor):
    """Exact two nearest neighbours from screened candidates (see the module docstring).

    Args:
        x: ``(n, d)`` original rows (float32/float64).
        norms: ``(n,)`` float64 squared norms of the centred rows the screen used.
        cand_d, cand_j: ``(n, KEEP)`` screened squared distances (float64, ascending) and
            indices (int64, -1 where fewer than KEEP other rows exist).

    Returns ``(r1sq, r2sq, idx1, idx2, fallbacks)``: exact float64 values and int64
    indices, ties to the lower index; ``fallbacks`` rows needed the exact scan.
    """
    n, d = x.shape
    valid = cand_j >= 0
    j = cand_j.clamp(min=0)
    exact = torch.empty(cand_j.shape, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(1, d * KEEP))
    for s in range(0, n, step):
        a = x[s:s + step].to(torch.float64)[:, None, :]
        exact[s:s + step] = (x[j[s:s + step]].to(torch.float64) - a).square_().sum(dim=2)
    exact = exact.masked_fill(~valid, float("inf"))
    # ascending (exact, index): sort by index first, then stably by value
    order = torch.sort(j.masked_fill(~valid, n), dim=1).indices
    e = exact.gather(1, order)
    jj = j.gather(1, order)
    e, o2 = torch.sort(e, dim=1, stable=True)
    jj = jj.gather(1, o2)
    eps = screen_error_bound(norms, d, x.dtype)
    complete = valid.sum(dim=1) == n - 1  # every other row was a candidate
    proven = (cand_d[:, KEEP - 1] - eps) > e[:, 1]
    r1, r2, i1, i2 = e[:, 0].clone(), e[:, 1].clone(), jj[:, 0].clone(), jj[:, 1].clone()
    redo = torch.nonzero(~(complete | proven)).flatten()
    if redo.numel():
        f1, f2, g1, g2 = knn2_reference(x, rows=redo)
        r1[redo], r2[redo], i1[redo], i2[redo] = f1, f2, g1, g2
    return r1, r2, i1, i2, int(redo.numel())


def _stats(screen_dtype: str, rescreened: int, exact_scans: int) -> dict:
    return {"screen": screen_dtype, "rescreened": int(rescreened), "exact_scans": int(exact_scans)}


@OP.register("reference", devices=("cpu", "cuda"), dtypes=_IN)
def _reference(x, allow_bf16):
    return (*knn2_reference(x), _stats("none (exact)", 0, x.shape[0]))


@OP.register("cpu", devices=("cpu",), dtypes=_IN)
def _cpu(x, allow_bf16):
    n = x.shape[0]
    r1 = torch.empty(n, dtype=torch.float64)
    r2 = torch.empty(n, dtype=torch.float64)
    i1 = torch.empty(n, dtype=torch.int64)
    i2 = torch.empty(n, dtype=torch.int64)
    bf16, rescreened, scans = cpu_kernels().knn2(x.data_ptr(), _dtypes.code(x.dtype), n, x.shape[1], x.stride(0),
                                                 x.stride(1), r1.data_ptr(), r2.data_ptr(), i1.data_ptr(),
                                                 i2.data_ptr(), bool(allow_bf16))
    screen = "bfloat16" if bf16 else str(x.dtype).replace("torch.", "")
    return r1, r2, i1, i2, _stats(screen, rescreened, scans)


def _screened(x, screen):
    """Centre, run ``screen(xc, norms, cand_d, cand_j)``, certify."""
    xc = _centred(x)
    norms = xc.to(torch.float64).square().sum(dim=1)
    cand_d = torch.full((x.shape[0], KEEP), float("nan"), dtype=torch.float64, device=x.device)
    cand_j = torch.full((x.shape[0], KEEP), -2, dtype=torch.int64, device=x.device)
    screen(xc, norms, cand_d, cand_j)
    *out, scans = certify(x, norms, cand_d, cand_j)
    return (*out, _stats(str(x.dtype).replace("torch.", ""), 0, scans))


@OP.register("cuda", devices=("cuda",), dtypes=_IN)
def _cuda(x, allow_bf16):
    def screen(xc, norms, cand_d, cand_j):
        with torch.cuda.device(xc.device):
            cuda_kernels().knn2_screen(xc.data_ptr(), _dtypes.code(xc.dtype), xc.shape[0], xc.shape[1],
                                       xc.stride(0), xc.stride(1), cand_d.data_ptr(), cand_j.data_ptr(),
                                       cuda_stream(xc))
    return _screened(x, screen)


@OP.register("triton", devices=("cpu", "cuda"), dtypes=_IN)
def _triton(x, allow_bf16):
    from ..kernels.knn2 import knn2_screen

    with on_device(x):
        return _screened(x, knn2_screen)


def knn2(x: torch.Tensor, *, backend: str | None = None, screen: str = "auto", return_stats: bool = False):
    """Two nearest neighbours of every row of ``x``, self excluded, exactly.

    Args:
        x: ``(n, d)`` float32/float64 tensor (any strides), n >= 3, finite.
        backend: force ``"reference" | "cpu" | "cuda" | "triton"``.
        screen: ``"auto"`` lets the CPU kernel screen float32 data in bfloat16 where the CPU
            has AVX512-BF16 (the answer stays exact: certified, else re-screened in float32,
            else scanned); ``"native"`` screens in the input precision.
        return_stats: also return ``{"screen", "rescreened", "exact_scans"}``: the screen's
            precision and how many rows needed a float32 re-screen or an exact scan.

    Returns:
        ``(r1sq, r2sq, idx1, idx2)``: ``(n,)`` float64 squared distances to the nearest and
        second-nearest other row (``r1sq <= r2sq``, exact float64 sums of squared
        differences, so duplicates give exactly 0) and their ``(n,)`` int64 indices; ties go
        to the lower index. With ``return_stats``, the stats dict as a fifth item.

    Example:
        >>> import torch, hierfast.ops as ops
        >>> x = torch.tensor([[0.0], [1.0], [3.0]])
        >>> r1, r2, i1, i2 = ops.knn2(x)
        >>> r1.tolist(), i1.tolist(), r2.tolist(), i2.tolist()
        ([1.0, 1.0, 4.0], [1, 0, 1], [9.0, 4.0, 9.0], [2, 2, 0])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (n, d), got shape {tuple(x.shape)}; flatten with x.reshape(n, -1)")
    if x.dtype not in _IN:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}; convert with .float()")
    n, d = x.shape
    if n < 3:
        raise ValueError(f"x has n={n} rows; two nearest neighbours need n >= 3")
    if d < 1:
        raise ValueError("x has no features (d=0)")
    if screen not in ("auto", "native"):
        raise ValueError(f"screen must be 'auto' or 'native', got {screen!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; distances to such rows are undefined — drop or fix those rows")
    impl = OP.select((x,), backend)
    *out, stats = impl.fn(x, screen == "auto")
    return (*out, stats) if return_stats else tuple(out)
