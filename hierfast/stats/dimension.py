"""Dimensionality of a layer's representation (METRICS.md §5).

* :func:`twonn` — intrinsic dimension by TwoNN (Facco et al. 2017, Sci. Rep. 7:12140): for
  each point mu = r2/r1 (second over first nearest-neighbour distance); a line through the
  origin of -log(1 - F(mu)) against log mu, F(mu_(i)) = i/N, fitted on the lowest
  ``fraction`` of mu (at most N - 1 points: F = N/N would put the last at -log 0 = inf).
  Points whose r1 = 0 (duplicates) or mu = 1 (tied distances, up to 1e-12) are left out,
  as in Ansuini et al.'s code. Ansuini et al. 2019 protocol: mean ± sd over ``resamples`` random 90 %
  subsets (the issue fixes 10 resamples; Ansuini used 50).
* :func:`participation_ratio` — (Σλ)²/Σλ² of the covariance eigenvalues (Gao et al. 2017).
* :func:`effective_rank` — exp(entropy of p_k = σ_k/Σσ), σ the singular values of the centred
  data (Roy & Vetterli 2007).
* :class:`DimensionAccumulator` — streaming: a seeded reservoir sample per layer (Vitter 1985)
  for TwoNN, and streamed float64 covariance sums (shifted by the first batch's means, so an
  offset does not cancel them away) for PR / effective rank.

Nearest neighbours come from the fused 2-NN kernel (:func:`hierfast.ops.knn2`), so the n x n
distance matrix is never held in memory.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._grams import centred_float64
from ._identity import uniform01
from ._normalize import ConstantLayerWarning
from .accumulator import check_options, reference_shift
from ..ops.knn2 import knn2
from ._validate import as_features, as_layers, layer_label

def two_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances ``(n,)`` to the first and second nearest other point (float64).

    Runs the fused pairwise-distance + 2-NN kernel :func:`hierfast.ops.knn2` (C++/OpenMP on
    the CPU, CUDA or Triton on a GPU): the n x n distance matrix is never stored; candidates
    are ranked in float32 (float64 input: float64) and the two kept distances are recomputed
    exactly in float64, so exact duplicates come out as exactly 0."""
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    r1, r2, _, _ = knn2(xs)
    return r1, r2


# mu = r2/r1 at most this far above 1 is a tie r1 = r2 (equal distances computed with rounding,
# e.g. on a grid or a circle): log mu ~ 1e-16 would dominate the fit through the origin. This
# floor covers the float64 arithmetic of knn2's recomputed distances; _tie_tolerance adds the
# rounding of the inputs themselves
_TIE = 1e-12


def _tie_tolerance(x, r1, i1, i2) -> torch.Tensor:
    """Per point, how far above 1 mu may be for a tie that the input's own rounding split.

    knn2 recomputes the kept distances in float64 from the input's values (rounding ~1e-16,
    covered by _TIE), but those values are rounded already: a float32 grid 0.1 apart is no
    exact grid (mu - 1 up to ~20 eps32 on a 30 x 30 grid). A point moved by at most u ||x||
    (u: unit roundoff of x's dtype), so r_k by at most u (||x|| + ||x_k||) and mu = r2/r1
    (r2 >= r1) by a relative (e1 + e2) / r1. 16-bit inputs use float32's u: their rounding
    (a bfloat16 grid's mu - 1 reaches 0.17) cannot tell a split tie from a real near-tie, and
    leaving such points out would bias every 16-bit estimate."""
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    u = torch.finfo(dt).eps / 2
    norm = torch.linalg.vector_norm(x.reshape(x.shape[0], -1).to(torch.float64), dim=1)
    return (u * (2.0 * norm + norm[i1] + norm[i2]) / torch.sqrt(r1)).clamp_min(_TIE)


def _twonn_fit(x: torch.Tensor, fraction: float) -> tuple[float, int]:
    """One TwoNN estimate; returns (dimension, number of points left out: duplicates and ties).

    Raises ValueError when fewer than 3 points have distinct first and second
    nearest-neighbour distances (duplicated rows, a constant layer, a grid)."""
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    r1, r2, i1, i2 = knn2(xs)
    keep = r1 > 0  # duplicates (r1 = 0) make mu infinite: dropped, as Ansuini et al.'s code does
    dup = ~keep
    mu = torch.sqrt(r2[keep] / r1[keep])
    tie = mu <= 1.0 + _tie_tolerance(x, r1, i1, i2)[keep]
    mu = mu[~tie]
    n = mu.numel()
    if n < 3:
        raise ValueError(
            f"TwoNN is undefined for this data: only {n} of {x.shape[0]} points have distinct first and second "
            f"nearest-neighbour distances ({int(dup.sum())} are exact duplicates of another point, "
            f"{int(tie.sum())} have tied distances r1 = r2, as on a grid or for a constant layer); "
            "it needs at least 3")
    mu, _ = torch.sort(mu)
    m = min(n - 1, max(2, int(math.floor(fraction * n))))  # F = n/n is -log(0): the last point never fits
    lx = torch.log(mu[:m])
    ly = -torch.log1p(-torch.arange(1, m + 1, dtype=torch.float64, device=mu.device) / n)
    return float((lx * ly).sum() / (lx * lx).sum()), x.shape[0] - n


def twonn(x, *, fraction: float = 0.9, resamples: int = 10, seed: int = 0) -> tuple[float, float]:
    """TwoNN intrinsic dimension of ``x`` ``(n, ...)``: ``(mean, sd)`` over ``resamples``
    random 90 % subsets (``resamples=1``: the full data, sd 0). ``fraction``: share of the
    sorted mu fitted (1.0 fits all but the largest, whose F = 1 has no finite -log(1 - F)).

    Raises ValueError for n < 8, NaN/inf, ``fraction`` outside (0, 1], or data on which
    TwoNN is undefined (fewer than 3 points with distinct nearest-neighbour distances)."""
    x = as_features(x, "x", min_n=8)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    n = x.shape[0]
    if resamples == 1:
        dims = [_twonn_fit(x, fraction)]
    else:
        g = torch.Generator().manual_seed(int(seed))
        k = max(8, int(0.9 * n))
        dims = [_twonn_fit(x[torch.randperm(n, generator=g)[:k].to(x.device)], fraction) for _ in range(resamples)]
    dup = max(d for _, d in dims)
    if dup > 0.01 * n:
        warnings.warn(f"TwoNN: {dup} of {n} points have an exact duplicate or tied nearest-neighbour distances "
                      "and were left out", RuntimeWarning, stacklevel=2)
    v = torch.tensor([d for d, _ in dims], dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=True)) if resamples > 1 else 0.0


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (>= 0) of the covariance of the rows of x (from the Gram when n < d), up to a
    power-of-two factor for features beyond 2^+-200 (:func:`centred_float64`)."""
    xc = centred_float64(x)  # exact zeros in constant columns: a constant layer's spectrum is exactly 0
    m = xc @ xc.T if xc.shape[0] < xc.shape[1] else xc.T @ xc
    return torch.linalg.eigvalsh(m).clamp_min(0.0) / max(x.shape[0] - 1, 1)


def _unit_max(lam: torch.Tensor) -> torch.Tensor:
    """Eigenvalues over their largest (PR and erank are scale-invariant; (Σλ)² of λ ~ 1e160
    overflowed a Python float)."""
    top = lam.max()
    return lam / top if float(top) > 0 else lam


def _pr(lam: torch.Tensor) -> float:
    lam = _unit_max(lam)
    s2 = float((lam * lam).sum())
    return float(lam.sum()) ** 2 / s2 if s2 > 0 else float("nan")


def _erank(lam: torch.Tensor) -> float:
    sig = _unit_max(lam).sqrt()
    tot = float(sig.sum())
    if tot <= 0:
        return float("nan")
    p = sig[sig > 0] / tot
    return float(torch.exp(-(p * p.log()).sum()))


def _warn_if_constant(value: float, name: str, what: str, stacklevel: int) -> float:
    if math.isnan(value):
        warnings.warn(f"the constant (zero-variance) layer {name} has no defined {what}: NaN",
                      ConstantLayerWarning, stacklevel=stacklevel + 1)
    return value


def participation_ratio(x) -> float:
    """(Σλ)²/Σλ² of the covariance eigenvalues of ``x`` ``(n, ...)``; NaN with a
    :class:`ConstantLayerWarning` for a constant layer."""
    return _warn_if_constant(_pr(_spectrum(as_features(x, "x", min_n=2))), "x", "the participation ratio", 2)


def effective_rank(x) -> float:
    """Roy & Vetterli effective rank exp(H(σ/Σσ)) of the centred ``x`` ``(n, ...)``; NaN with a
    :class:`ConstantLayerWarning` if constant."""
    return _warn_if_constant(_erank(_spectrum(as_features(x, "x", min_n=2))), "x", "the effective rank", 2)


def _streamed_spectrum(name: str, sums) -> torch.Tensor:
    """Eigenvalues of the streamed covariance; ValueError when its float64 sums overflowed
    (features beyond ~1e150: the reservoir's spectrum rescales, streamed sums cannot)."""
    cov = _covariance(sums)
    if not bool(torch.isfinite(cov).all()):  # once per layer in compute, not per batch
        raise ValueError(f"{name}: the streamed covariance sums overflowed float64 (features of magnitude beyond "
                         "~1e150); the participation ratio and effective rank are scale-invariant: multiply the "
                         "features by a power of two first")
    return torch.linalg.eigvalsh(cov).clamp_min(0.0)


def _covariance(sums) -> torch.Tensor:
    """Unbiased (d, d) covariance from shifted sums (n, Σ(x - s), Σ(x - s)(x - s)^T, s)."""
    n, sx, sxx = sums[:3]
    return (sxx - torch.outer(sx, sx) / n) / max(float(n) - 1, 1.0)


def _reshift(sums, shift: torch.Tensor) -> tuple:
    """The same sums about the reference ``shift``: x - s' = (x - s) - d, d = s' - s."""
    n, sx, sxx, old = sums
    d = shift - old
    return (n, sx - n * d, sxx - torch.outer(sx, d) - torch.outer(d, sx) + n * torch.outer(d, d), shift.clone())


def _with_shift(sums):
    """4-tuple sums; a 3-tuple from a state saved before shifted sums is about 0."""
    return sums if sums is None or len(sums) == 4 else (*sums, torch.zeros_like(sums[1]))


class DimensionAccumulator:
    """Streaming dimensionality per layer.

    Args:
        reservoir: points kept per layer for TwoNN (uniform reservoir sample of the stream;
            the choice of which rows is a seeded hash of each row's stream position, so a
            resumed run keeps the same sample).
        max_dim: layers up to this width get PR / effective rank from streamed float64 sums
            (exact over the whole stream); wider ones from the reservoir sample.
        resamples, fraction, seed: for :func:`twonn`.

    ``update(feats)``: list/dict of ``(b, ...)`` tensors. ``compute()`` -> dict of per-layer
    float64 tensors ``twonn``, ``twonn_sd``, ``participation_ratio``, ``effective_rank``.
    """

    def __init__(self, *, reservoir: int = 2000, max_dim: int = 1024, resamples: int = 10, fraction: float = 0.9,
                 seed: int = 0) -> None:
        if not isinstance(reservoir, int) or reservoir < 8:
            raise ValueError(f"reservoir must be an int >= 8, got {reservoir!r}")
        self.reservoir, self.max_dim, self.resamples, self.fraction, self.seed = (
            reservoir, int(max_dim), resamples, fraction, int(seed))
        self.reset()

    def reset(self) -> None:
        self.names = None
        self.seen = 0
        self.samples: list[torch.Tensor] = []
        self.sums: list[tuple | None] = []

    def update(self, feats) -> None:
        names, xs = as_layers(feats, "feats")
        xs = [as_features(x, layer_label(names, i, "feats"), min_n=1).to(torch.float64) for i, x in enumerate(xs)]
        b = xs[0].shape[0]
        if any(x.shape[0] != b for x in xs):
            raise ValueError("every layer of a batch must have the same number of rows")
        if self.names is None and not self.samples:
            self.names = names
            self.samples = [x.new_zeros(0, x.shape[1]) for x in xs]
            self.sums = [(torch.zeros((), dtype=torch.float64), x.new_zeros(x.shape[1]),
                          x.new_zeros(x.shape[1], x.shape[1]), reference_shift(x))
                         if x.shape[1] <= self.max_dim else None for x in xs]
        elif len(xs) != len(self.samples) or any(x.shape[1] != s.shape[1] for x, s in zip(xs, self.samples)):
            raise ValueError("this batch's layers differ from the first batch's; pass the same layers every time")
        pos = torch.arange(self.seen, self.seen + b)
        # Algorithm R: row t fills slot t while t < R, else replaces slot floor(u * (t + 1)) if < R
        slot = torch.where(pos < self.reservoir, pos, (uniform01(pos, self.seed) * (pos + 1)).long())
        fill = (pos < self.reservoir).nonzero().flatten()  # fill phase: appended in order, in bulk
        replace = ((pos >= self.reservoir) & (slot < self.reservoir)).nonzero().flatten().tolist()
        for i, x in enumerate(xs):
            s = torch.cat([self.samples[i], x[fill]]) if fill.numel() else self.samples[i]
            for r in replace:  # rare once the reservoir is full (about b * R / t rows per batch)
                s[int(slot[r])] = x[r]
            self.samples[i] = s
            if self.sums[i] is not None:
                n, sx, sxx, shift = self.sums[i]
                xs_ = x - shift
                self.sums[i] = (n + b, sx + xs_.sum(0), sxx + xs_.T @ xs_, shift)
        self.seen += b

    def compute(self) -> dict:
        if not self.samples:
            raise ValueError("DimensionAccumulator.compute() called before any update(): feed at least one batch")
        out = {k: [] for k in ("twonn", "twonn_sd", "participation_ratio", "effective_rank")}
        layers = self.names or [f"feats[{i}]" for i in range(len(self.samples))]
        for name, s, sums in zip(layers, self.samples, self.sums):
            m, sd = self._twonn(name, s)
            lam = _streamed_spectrum(name, sums) if sums is not None else _spectrum(s)
            pr, er = _pr(lam), _erank(lam)
            _warn_if_constant(pr, name, "the participation ratio and effective rank", 2)
            out["twonn"].append(m)
            out["twonn_sd"].append(sd)
            out["participation_ratio"].append(pr)
            out["effective_rank"].append(er)
        res = {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
        res["layers"] = layers
        return res

    def _twonn(self, name: str, s: torch.Tensor) -> tuple[float, float]:
        """TwoNN of one layer's reservoir; NaN with a RuntimeWarning naming the layer where it is
        undefined (a dead or constant layer: every point a duplicate), so that one such layer
        does not abort the whole analysis."""
        try:
            return twonn(s, fraction=self.fraction, resamples=self.resamples, seed=self.seed)
        except ValueError as e:
            warnings.warn(f"layer {name}: {e}; its twonn is NaN", RuntimeWarning, stacklevel=3)
            return float("nan"), float("nan")

    def _options(self) -> dict:
        """Options the state depends on (which rows the reservoir keeps, which layers get
        streamed sums): saved, and checked by ``load_state_dict`` and ``merge``. ``resamples``
        and ``fraction`` only enter ``compute`` and may differ."""
        return {"reservoir": self.reservoir, "max_dim": self.max_dim, "seed": self.seed}

    def _check_options(self, saved: dict | None, what: str) -> None:
        check_options("DimensionAccumulator", self._options(), saved, what)

    def state_dict(self) -> dict:
        return {"names": self.names, "seen": self.seen, "samples": [s.clone() for s in self.samples],
                "sums": [None if t is None else tuple(v.clone() for v in t) for t in self.sums],
                "options": self._options()}

    def load_state_dict(self, state: dict) -> "DimensionAccumulator":
        self._check_options(state.get("options"), "state was saved by")
        self.names, self.seen = state["names"], state["seen"]
        self.samples = [s.clone() for s in state["samples"]]
        self.sums = [None if t is None else tuple(v.clone() for v in _with_shift(t)) for t in state["sums"]]
        return self

    def merge(self, other: "DimensionAccumulator") -> "DimensionAccumulator":
        """Add another shard's state (:func:`merge_states`: reservoirs concatenated, sums
        added). Both must have the same options and layers."""
        if not isinstance(other, DimensionAccumulator):
            raise TypeError(f"other must be a DimensionAccumulator, got {type(other).__name__}")
        self._check_options(other._options(), "cannot merge a")
        return self.load_state_dict(merge_states([self.state_dict(), other.state_dict()]))

    def sync(self, group=None) -> "DimensionAccumulator":
        """Gather every rank's state and merge them in rank order (all ranks end equal); a
        rank without data adds nothing. No-op when not distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        return self.load_state_dict(merge_states(states))


def _is_empty(state: dict) -> bool:
    return not state["samples"]


def merge_states(states: list[dict]) -> dict:
    """Combine the states of accumulators that saw disjoint shards (e.g. one per rank):
    reservoirs are concatenated (TwoNN then runs on the union) and sums added, each first
    re-expressed about the first state's reference point. Empty states (no batch seen) add
    nothing; states with different options or layers are refused (ValueError)."""
    full = [s for s in states if not _is_empty(s)]
    opts = [s["options"] for s in states if s.get("options") is not None]
    if any(o != opts[0] for o in opts):
        raise ValueError(f"cannot merge DimensionAccumulator states with different options {opts}")
    if not full:
        return {**states[0], "seen": sum(s["seen"] for s in states)}
    widths = [[x.shape[1] for x in s["samples"]] for s in full]
    if any(w != widths[0] for w in widths):
        raise ValueError(f"cannot merge DimensionAccumulator states over different layers (widths {widths}); "
                         "every shard must see the same layers")
    base = {"names": full[0]["names"], "seen": sum(s["seen"] for s in states), "samples": [], "sums": []}
    if opts:
        base["options"] = opts[0]
    for i in range(len(full[0]["samples"])):
        base["samples"].append(torch.cat([s["samples"][i] for s in full]))
        sums = [_with_shift(s["sums"][i]) for s in full]
        if sums[0] is None:
            base["sums"].append(None)
            continue
        ref = sums[0][3]
        sums = [_reshift(t, ref.to(t[1].device)) for t in sums]
        base["sums"].append((*(sum(v) for v in zip(*(t[:3] for t in sums))), ref.clone()))
    return base
