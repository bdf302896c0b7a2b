"""Per-layer Grams and their centred forms: the building blocks of all-pairs CKA.

A layer's features are centred per batch (float64 means) before the Gram is
formed: float32 Grams of raw post-ReLU features cancel catastrophically in the
unbiased HSIC (DESIGN.md "Traps"). Grams are formed in float32 for float16/
bfloat16/float32 features (fast GEMM) and in float64 for float64 features; every
HSIC sum downstream is float64.
"""
from __future__ import annotations

import math

import torch

from .. import ops


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 features stay float64 (never downcast); everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Workspace:
    """Reusable buffers keyed by (slot, shape, dtype, device).

    Streaming accumulators see the same shapes every batch; reusing the centred
    feature buffers avoids a fresh multi-MB allocation (and its page faults) per
    layer per batch.
    """

    def __init__(self):
        self._bufs: dict = {}
        self.centre_first: set = set()  # slots whose raw Gram was ill-conditioned last time

    def get(self, slot, shape, dtype, device) -> torch.Tensor:
        key = (slot, tuple(shape), dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None:
            # one buffer per slot: drop stale shapes (e.g. a ragged last batch)
            self._bufs = {k: v for k, v in self._bufs.items() if k[0] != slot}
            buf = self._bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def __getstate__(self):  # buffers are scratch: never pickled or checkpointed
        return {"_bufs": {}, "centre_first": set()}


def _centered_unchecked(x, backend, workspace, slot):
    """``(x - column means in the compute dtype, float64 means (d,))``, not yet checked."""
    dt = compute_dtype(x)
    out = workspace.get(slot, x.shape, dt, x.device) if workspace is not None else None
    return ops.center_columns(x, out_dtype=dt, out=out, backend=backend)


def _centered_and_mean(x, label, backend, workspace, slot):
    """:func:`_centered_unchecked`, then ValueError naming ``label`` for NaN/inf (detected
    from the means, so no extra pass over the features)."""
    xc, mean = _centered_unchecked(x, backend, workspace, slot)
    if not bool(torch.isfinite(mean).all()):
        _raise_nonfinite(x, label)
    return xc, mean


def centered(x: torch.Tensor, label: str = "x", *, backend: str | None = None,
             workspace: Workspace | None = None, slot=None) -> torch.Tensor:
    """(n, d) features minus their column means, in the compute dtype.

    Raises ValueError naming ``label`` when ``x`` holds NaN or inf (detected from
    the float64 column means, so no extra pass over the features).
    """
    return _centered_and_mean(x, label, backend, workspace, slot)[0]


def _constant_trace_tol(n: int) -> float:
    """Relative trace below which a centred Gram may be a constant layer's rounding residue.

    Centring a constant column c leaves x - mean ~ n eps64 |c| (the float64 mean's
    summation error), not 0, so tr(Xc Xc^T) <= n (n eps64)^2 ||mean||^2. Generous on
    purpose: a layer under it only pays for the exact test."""
    return max(1e-20, (16 * n * 2.0 ** -52) ** 2)


def _is_constant(tr: float, m2: float, x: torch.Tensor) -> bool:
    """Is the layer behind a centred Gram of trace ``tr`` exactly constant (every row equal)?
    ``m2``: the squared norm of its column means.

    The O(n) trace test runs on every call; the exact ``x == x[0]`` pass only when the
    trace is at the rounding level of the means (``_constant_trace_tol``)."""
    n = x.shape[0]
    if not tr <= _constant_trace_tol(n) * n * m2:
        return False
    return bool((x == x[:1]).all())


def centered_gram(x: torch.Tensor, label: str = "x", *, backend: str | None = None,
                  workspace: Workspace | None = None, slot=None, rescalable: bool = False) -> torch.Tensor:
    """Gram of the column-centred features, (n, n) in the compute dtype.

    Exactly zero for an exactly constant layer, so that its self-HSIC is 0 and its
    CKA NaN with a warning: centring alone leaves ~1e-17 residues, whose Gram gives
    finite garbage (a CKA of -0.05 for a constant float64 layer). ValueError naming
    ``label`` for NaN/inf features, and for finite ones whose Gram or HSIC would under- or
    overflow (:func:`_check_magnitude`) unless ``rescalable`` (the one-shot functions, which
    then recompute the layer from a rescaled copy)."""
    xc, mean = _centered_unchecked(x, backend, workspace, slot)
    g = symmetric_gram(xc)
    # one host sync for the finiteness test and the constant-layer test together
    ok, tr, m2 = torch.stack([torch.isfinite(mean).all().to(torch.float64), g.diagonal().sum(dtype=torch.float64),
                              mean @ mean]).tolist()
    if not ok:
        _raise_nonfinite(x, label)
    if _is_constant(tr, m2, x):
        g.zero_()
    elif not rescalable:
        _check_magnitude(tr, g.dtype, x, label)
    return g


# HSICs are float64 sums of squared Gram entries, about tr(K)^2: a trace beyond 2^500 overflows
# them, one below 2^-500 underflows them, and one at or below the smallest normal number of the
# Gram's dtype lost its digits already
_MAX_TRACE = 2.0 ** 500
_MIN_TRACE = 2.0 ** -500


def _check_magnitude(tr: float, dtype: torch.dtype, x: torch.Tensor, label: str) -> None:
    """ValueError for a non-constant layer whose centred Gram trace ``tr`` is out of range (the
    streaming CKA would return NaN, or a zero self-HSIC taken for a constant layer)."""
    if math.isfinite(tr) and max(torch.finfo(dtype).tiny, _MIN_TRACE) < tr <= _MAX_TRACE:
        return
    raise ValueError(f"{label} has features of extreme magnitude (centred Gram trace {tr:.3g} in {dtype}): their "
                     "Gram or HSIC under- or overflows. CKA is scale-invariant: multiply the features by a power "
                     "of two first (cka_matrix and linear_cka rescale such layers themselves)")


def centred_float64(x: torch.Tensor) -> torch.Tensor:
    """(n, d) float64 features minus their column means, exactly 0 in exactly constant
    columns (whose centring would leave rounding residues). For the feature-space and
    spectrum paths, whose O(n d^2) cost dwarfs this O(n d) min/max.

    For scale-invariant callers only: when the widest column range is beyond 2^+-200
    (fourth powers would overflow or underflow float64), the result is multiplied by a
    power of two (exact) that brings it to about 1."""
    x64 = x.to(torch.float64)
    lo, hi = torch.aminmax(x64, dim=0)
    xc = (x64 - x64.mean(0)).masked_fill_((lo == hi)[None, :], 0.0)
    k = pow2_exponent(float((hi - lo).max()))
    return xc.mul_(2.0 ** k) if k else xc


def pow2_exponent(spread: float, limit: int = 200) -> int:
    """k such that spread * 2^k is about 1 when ``spread`` lies outside [2^-limit, 2^limit], else 0."""
    if not (math.isfinite(spread) and spread > 0):
        return 0
    e = math.frexp(spread)[1]
    return -e if abs(e) > limit else 0


def rescaled_copy(x: torch.Tensor) -> torch.Tensor:
    """``(x - x[0]) * 2^k`` (a copy; shift and power of two keep every CKA exact) with the
    widest column range brought to about 1, in float32 (float64 for float64 ``x``).
    For the rare layer whose Gram under- or overflowed; costs two passes over ``x``."""
    x64 = x.to(torch.float64) - x[:1].to(torch.float64)
    lo, hi = torch.aminmax(x64, dim=0)
    spread = float((hi - lo).max())
    k = -math.frexp(spread)[1] if math.isfinite(spread) and spread > 0 else 0
    return x64.mul_(2.0 ** k).to(compute_dtype(x))


def _row_blocks(n: int) -> int:
    """Row blocks for the symmetric Gram, chosen by measurement on a 2-core AVX-512
    Xeon (MKL sgemm, d = 32768): n = 128: 2 blocks 6.1 ms vs one GEMM 6.8 ms;
    n = 1024: 4 blocks 0.21 s, 8 blocks 0.22 s, one GEMM 0.34 s."""
    if n < 128:
        return 1
    if n < 512:
        return 2
    return 4 if n < 4096 else 8


def symmetric_gram(xc: torch.Tensor) -> torch.Tensor:
    """``xc @ xc.T`` computing only the upper block triangle (then mirroring).

    With nb row blocks, nb(nb+1)/2 of nb^2 block products are formed (75 % of the
    FLOPs at nb = 2, 62.5 % at nb = 4). torch exposes no BLAS syrk, and numpy's
    OpenBLAS ssyrk measured 2.3x slower than torch's sgemm here.
    """
    n = xc.shape[0]
    nb = _row_blocks(n)
    if nb == 1 or xc.shape[1] < 256:  # small d: one GEMM is cheaper than several launches
        return xc @ xc.T
    edges = [round(i * n / nb) for i in range(nb + 1)]
    g = torch.empty(n, n, dtype=xc.dtype, device=xc.device)
    for bi in range(nb):
        ri = slice(edges[bi], edges[bi + 1])
        # one GEMM for the row block against itself and every later row block
        g[ri, edges[bi]:] = xc[ri] @ xc[edges[bi]:].T
    for bi in range(1, nb):
        ri = slice(edges[bi], edges[bi + 1])
        g[ri, :edges[bi]] = g[:edges[bi], ri].T
    return g


# Largest conditioning ratio r = tr K / tr HKH = sum ||x_i||^2 / sum ||x_i - mean||^2 for
# which the Gram of *uncentred* features is used. The epilogue's (U-)centring removes
# the mean exactly in exact arithmetic; the float32 GEMM's rounding grows with r.
# Measured (128 samples, d = 64..32768, vs float64): CKA error ~1.3e-7 * r at
# d = 32768, so r <= 8 keeps it near 1e-6, ten times inside the 1e-5 target.
# Post-ReLU features typically have r ~ 1.5; the trap case (mean 50) has r ~ 2500.
_MAX_RATIO = {torch.float32: 8.0, torch.float64: 1e6}


def _conditioning_ok(trace: float, total: float, n: int, dtype: torch.dtype, x: torch.Tensor, label: str,
                     rescalable: bool = False) -> bool:
    """Is the raw Gram accurate enough, given its trace and the sum of all its entries?

    Raises ValueError naming ``label`` when either is non-finite (NaN/inf features; with
    ``rescalable``, finite features whose squares overflowed go to the centred path instead).
    """
    if not (math.isfinite(trace) and math.isfinite(total)):
        if rescalable and bool(torch.isfinite(x).all()):  # a pass over x on this rare path only
            return False
        _raise_nonfinite(x, label)
    centred_trace = trace - total / n
    if not centred_trace > 0:  # constant layer or catastrophic cancellation: centre first
        return False
    return trace / centred_trace <= _MAX_RATIO[dtype]


def _raw_gram_is_usable(g: torch.Tensor, x: torch.Tensor, label: str) -> bool:
    """Conditioning test from the Gram itself (O(n^2), no pass over the features)."""
    tr, tot = torch.stack([g.diagonal().sum(dtype=torch.float64), g.sum(dtype=torch.float64)]).tolist()
    return _conditioning_ok(tr, tot, g.shape[0], g.dtype, x, label)


def _raise_nonfinite(x: torch.Tensor, label: str):
    bad = (~torch.isfinite(x)).any(dim=1).nonzero()
    where = f" (first at sample {bad[0].item()})" if len(bad) else ""
    raise ValueError(f"{label} contains NaN or inf{where}, or values so large that their squares overflow; "
                     "CKA of non-finite features is undefined: check the model and inputs")


_PROBE_ROWS = 64


def _probe_says_centre(x: torch.Tensor) -> bool:
    """For large n, the conditioning ratio of a row subsample (its Gram costs
    (64/n)^2 of the full one) predicts whether the raw Gram would be rejected, so
    an ill-conditioned layer does not pay for two n x n GEMMs."""
    n = x.shape[0]
    if n <= 4 * _PROBE_ROWS:
        return False
    idx = torch.linspace(0, n - 1, _PROBE_ROWS, device=x.device).round().long()
    sub = x.index_select(0, idx)
    g = sub @ sub.T
    tr = g.diagonal().sum(dtype=torch.float64)
    centred_trace = tr - g.sum(dtype=torch.float64) / _PROBE_ROWS
    return not bool(centred_trace > 0) or bool(tr / centred_trace > _MAX_RATIO[x.dtype] / 2)


def linear_gram(x: torch.Tensor, label: str = "x", *, backend=None, workspace=None, slot=None) -> torch.Tensor:
    """Gram of the features, (n, n) in the compute dtype, accurate for the centred CKA.

    float32/float64 features: the raw Gram is formed first and kept when the
    conditioning ratio allows (no centring pass: on the CKA benchmark this halves
    the memory traffic); otherwise — and always for float16/bfloat16, which need an
    upcast anyway — the Gram of the column-centred features. A workspace remembers
    per layer that centring was needed, and for large n a subsample probes first.
    """
    remembered = workspace is not None and slot in workspace.centre_first
    if x.dtype in _MAX_RATIO and not remembered and not _probe_says_centre(x):
        g = symmetric_gram(x)
        if _raw_gram_is_usable(g, x, label):
            return g
        if workspace is not None:
            workspace.centre_first.add(slot)
    return centered_gram(x, label, backend=backend, workspace=workspace, slot=slot)


def rbf_gram(x: torch.Tensor, threshold: float, label: str = "x", *, backend=None, workspace=None, slot=None):
    """Gaussian-kernel Gram, float64 (n, n).

    sigma^2 = threshold^2 * median of the n x n squared-distance matrix, diagonal
    included (Kornblith et al. 2019 reference code, ``gram_rbf``). Returns None when
    the median is 0 (constant layer): the kernel is then undefined.
    """
    g = linear_gram(x, label, backend=backend, workspace=workspace, slot=slot).to(torch.float64)
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    flat = d2.reshape(-1)
    m = flat.numel()
    # numpy's median of an even count averages the two middle values.
    lo = torch.kthvalue(flat, (m + 1) // 2).values
    hi = torch.kthvalue(flat, m // 2 + 1).values if m % 2 == 0 else lo
    med = 0.5 * (lo + hi)
    if med.item() <= 0.0:
        return None
    return torch.exp(d2 / (-2.0 * threshold * threshold * med))


def stacked_centered_grams(layers, labels, *, unbiased: bool, kernel: str = "linear", threshold: float = 1.0,
                           backend: str | None = None, workspace: Workspace | None = None,
                           slot_prefix: str = "", rescalable: bool = False) -> torch.Tensor:
    """One centred (biased) or U-centred (unbiased) Gram per layer, as rows of (L, n*n) float64.

    Layers whose kernel is undefined (RBF of a constant layer) get a zero row, which
    the caller turns into NaN with a warning. Linear kernel: features of extreme magnitude
    raise ValueError, or with ``rescalable`` give a non-finite or tiny row that the caller
    recomputes from a rescaled copy.
    """
    n = layers[0].shape[0]
    F = torch.empty(len(layers), n * n, dtype=torch.float64, device=layers[0].device)
    for i, (x, label) in enumerate(zip(layers, labels)):
        kw = dict(backend=backend, workspace=workspace, slot=f"{slot_prefix}{i}")
        if kernel == "linear":
            if not _raw_epilogue_ok(x, label, F[i], unbiased, rescalable=rescalable, **kw):
                g = centered_gram(x, label, rescalable=rescalable, **kw)
                ops.gram_epilogue(g, unbiased=unbiased, out=F[i], backend=backend)
            continue
        g = rbf_gram(x, threshold, label, **kw)
        if g is None:
            F[i].zero_()
            continue
        ops.gram_epilogue(g, unbiased=unbiased, out=F[i], backend=backend)
    return F


def _raw_epilogue_ok(x, label, out, unbiased, *, backend, workspace, slot, rescalable=False) -> bool:
    """Try the linear path without a centring pass: (U-)centre the raw Gram into
    ``out`` and keep it when the conditioning ratio allows. The epilogue's total
    doubles as the conditioning and NaN test, so the accepted path costs one GEMM,
    one epilogue and one host sync. Returns False when the caller must centre first.
    """
    if x.dtype not in _MAX_RATIO or (workspace is not None and slot in workspace.centre_first) \
            or _probe_says_centre(x):
        return False
    g = symmetric_gram(x)
    _, _, total = ops.gram_epilogue(g, unbiased=unbiased, out=out, backend=backend)
    trace, total = torch.stack([g.diagonal().sum(dtype=torch.float64), total]).tolist()
    if unbiased:  # the unbiased epilogue's total leaves out the diagonal
        total += trace
    if _conditioning_ok(trace, total, x.shape[0], g.dtype, x, label, rescalable):
        if not rescalable:  # the trace is on the host already: no extra sync
            _check_magnitude(trace, g.dtype, x, label)
        return True
    if workspace is not None:
        workspace.centre_first.add(slot)
    return False
