"""Invariance of each layer to an input transform T (METRICS.md §3.5, §3.6).

Normalised invariance score (two-view, NIS_2; one-sided NIS_1 when T' is the identity)::

    NIS(T) = 1 - E ||f(Tx) - f(T'x)||^2 / E ||f(x) - f(x')||^2,   E ||f(x) - f(x')||^2 = 2 tr Cov f

1 = invariant, 0 = T moves the layer as far as swapping in another random input,
negative = further. The denominator uses the unbiased (n - 1) covariance of the
untransformed features. Provenance: the normalised variance of Quiroga et al. 2023
("Invariance Measures for Neural Networks", arXiv 2310.17404) and the class-separation
R^2 of Kornblith et al. 2021, with (x, Tx) pairs in place of classes.

CKA invariance (§3.6): debiased minibatch CKA (Nguyen et al. 2021) between f(X) and
f(TX), rows paired. CKA is blind to orthogonal re-mappings (circular shifts of
flattened conv maps give CKA 1 and NIS < 1): it measures preserved geometry, NIS
literal invariance. Report both.
"""
from __future__ import annotations

import warnings

import torch

from ._normalize import ConstantLayerWarning
from ._validate import as_features, as_layers, check_same_batch, layer_label
from .accumulator import Accumulator, reference_shift
from .minibatch_cka import MinibatchCKA


def _prepare(feats, name):
    """-> (names, [(n, d) float64], labels, single) accepting a bare tensor for one layer.

    Finiteness is checked later from the float64 sums (d values, not n x d), see
    :func:`_raise_if_nonfinite`."""
    single = isinstance(feats, torch.Tensor)
    names, xs = as_layers([feats] if single else feats, name)
    labels = [layer_label(names, i, name) for i in range(len(xs))]
    xs = [as_features(x, lab, min_n=2, check_finite=False).to(torch.float64) for x, lab in zip(xs, labels)]
    return names, xs, labels, single


def _raise_if_nonfinite(sums, groups) -> None:
    """NaN/inf anywhere in the inputs makes a sum non-finite; only then find and name the layer."""
    if bool(torch.isfinite(torch.stack([v.sum() for v in sums])).all()):
        return
    for xs, labels in groups:
        for x, lab in zip(xs, labels):
            as_features(x, lab, min_n=1, check_finite=True)  # raises, naming the layer and sample
    raise ValueError("the features' squares overflow float64; rescale the features")


def _check_pairs(ref, other, names_r, names_o, lab_r, lab_o):
    if len(ref) != len(other) or names_r != names_o:
        raise ValueError(f"{lab_o[0].split('[')[0]} has layers {names_o or len(other)} but f_ref has "
                         f"{names_r or len(ref)}; pass the same layers for every view")
    for a, b, la, lb in zip(ref, other, lab_r, lab_o):
        if a.shape != b.shape:
            raise ValueError(f"{lb} has shape {tuple(b.shape)} but {la} has {tuple(a.shape)}; the transformed "
                             "and reference features of a layer must be paired row by row")


def _ratio(num: torch.Tensor, den: torch.Tensor, names, what: str) -> torch.Tensor:
    dead = den <= 0
    if bool(dead.any()):
        warnings.warn(f"{what} is undefined where the reference features are constant (zero variance): "
                      f"{', '.join(names[i] for i in dead.nonzero().flatten().tolist())} -> NaN",
                      ConstantLayerWarning, stacklevel=4)
    out = 1.0 - num / den
    out[dead] = float("nan")
    return out


class InvarianceAccumulator(Accumulator):
    """Streaming NIS per layer (and per unit), optionally with CKA invariance.

    State (float64 sums, merge by addition): ``n``; per unit Σ(f - s), Σ(f - s)² of the
    reference features, shifted by a per-unit reference s fixed by the first batch (raw
    sums cancel: a constant layer's variance came out as -1e17; a unit constant over the
    stream now sums exact zeros, so its NIS is NaN with a warning); Σ(f(Tx) - f(x))²
    (one-sided) and, when a second view is given, Σ(f(Tx) - f(T'x))² (two-view). Layers
    are concatenated along one axis. ``merge`` / ``sync`` convert other references.

    Args:
        per_unit: also return per-unit scores (1 - E Δ_j² / (2 Var f_j)).
        cka: also accumulate debiased minibatch CKA(f(X), f(TX)) per layer (batches of >= 4).

    Example:
        >>> import torch
        >>> acc = InvarianceAccumulator()
        >>> x = torch.randn(64, 8)
        >>> acc.update([x + 0.1 * torch.randn(64, 8)], [x + 0.1 * torch.randn(64, 8)], [x])
        >>> 0.9 < acc.compute()["nis"][0].item() <= 1.0
        True
    """

    _sum_states = ("n", "s_f", "s_ff", "s_d1", "s_d2")
    _meta_keys = ("names", "dims", "two_view", "per_unit", "with_cka")
    _shift_states = ("shift",)

    def __init__(self, *, per_unit: bool = False, cka: bool = True) -> None:
        self._per_unit_opt, self._cka_opt = bool(per_unit), bool(cka)
        self._cka = MinibatchCKA() if cka else None
        super().__init__()

    def reset(self) -> None:
        super().reset()
        if getattr(self, "_cka", None) is not None:
            self._cka.reset()

    def update(self, f_t, f_t2, f_ref) -> None:
        """Add one batch.

        Args:
            f_t: features of T(x): list/tuple/dict of ``(b, ...)`` tensors, one per layer.
            f_t2: features of T'(x) (an independent draw), or None for the one-sided score.
            f_ref: features of the untransformed x (same layers, same rows).
        """
        names, ref, lab_r, _ = _prepare(f_ref, "f_ref")
        names_t, ft, lab_t, _ = _prepare(f_t, "f_t")
        _check_pairs(ref, ft, names, names_t, lab_r, lab_t)
        two_view = f_t2 is not None
        if two_view:
            names_t2, ft2, lab_t2, _ = _prepare(f_t2, "f_t2")
            _check_pairs(ref, ft2, names, names_t2, lab_r, lab_t2)
        check_same_batch(ref + ft + (ft2 if two_view else []),
                         lab_r + lab_t + (lab_t2 if two_view else []))
        layout = {"names": names, "dims": [x.shape[1] for x in ref], "two_view": two_view,
                  "per_unit": self._per_unit_opt, "with_cka": self._cka_opt}
        if self.initialized and self._meta() != layout:
            raise ValueError(f"this batch's layout {layout} differs from the first batch's {self._meta()}; "
                             "every update must pass the same layers and views")
        r = torch.cat(ref, dim=1)
        t = torch.cat(ft, dim=1)
        n = torch.tensor([float(r.shape[0])], dtype=torch.float64, device=r.device)
        shift = self.shift.to(r.device) if self.initialized else reference_shift(r)
        rs = r - shift
        s_f, s_ff = rs.sum(0), (rs * rs).sum(0)
        s_d1 = ((t - r) ** 2).sum(0)
        s_d2 = ((t - torch.cat(ft2, dim=1)) ** 2).sum(0) if two_view else torch.zeros_like(s_d1)
        _raise_if_nonfinite((s_f, s_ff, s_d1, s_d2),
                            [(ref, lab_r), (ft, lab_t)] + ([(ft2, lab_t2)] if two_view else []))
        if self._cka is not None:
            if r.shape[0] < 4:
                raise ValueError(f"batch of {r.shape[0]} samples: CKA invariance needs batches of >= 4 "
                                 "(the unbiased HSIC divides by n-3); use cka=False for tiny batches")
            self._cka.update(ref, ft)
        if not self.initialized:
            for k, v in layout.items():
                setattr(self, k, v)
            self.n, self.s_f, self.s_ff, self.s_d1, self.s_d2 = n, s_f, s_ff, s_d1, s_d2
            self.shift = shift
        else:
            for k, v in zip(self._sum_states, (n, s_f, s_ff, s_d1, s_d2)):
                getattr(self, k).add_(v.to(getattr(self, k).device))

    # CKA lives in a nested accumulator: keep it in merge / state / sync
    def merge(self, other):
        was_initialized = self.initialized  # else the base class loads other's state, CKA included
        super().merge(other)
        if was_initialized and other.initialized and self._cka is not None and other._cka is not None:
            self._cka.merge(other._cka)
        return self

    def _reshifted(self, shifts) -> dict:
        """Σ(f - s), Σ(f - s)² about the reference ``shifts[0]`` (f - s' = f - s - d)."""
        d = shifts[0].to(self.s_f.device) - self.shift
        n = self.n
        out = {k: getattr(self, k) for k in self._sum_states}
        out["s_ff"] = self.s_ff - 2.0 * d * self.s_f + n * d * d
        out["s_f"] = self.s_f - n * d
        return out

    def _options(self) -> dict:
        return {"per_unit": self._per_unit_opt, "cka": self._cka_opt}

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self._cka is not None and self._cka.initialized:
            out["cka_state"] = self._cka.state_dict()
        return out

    def load_state_dict(self, state: dict):
        # states of older versions record the options only in the layout: check those
        if isinstance(state, dict) and state.get("options") is None and "per_unit" in state:
            self._check_options({"per_unit": state["per_unit"], "cka": state.get("with_cka")}, "state was saved by")
        super().load_state_dict(state)
        if self._cka is not None:
            self._cka.reset()
        if not self.initialized:  # an empty state
            return self
        if self.shift is None:  # a state saved before shifted sums: raw sums, reference 0
            self.shift = torch.zeros_like(self.s_f)
        if self._cka is not None and "cka_state" in state:
            self._cka.load_state_dict(state["cka_state"])
        return self

    def sync(self, group=None, *, allow_empty: bool = False):
        super().sync(group, allow_empty=allow_empty)
        if self._cka is not None:  # every rank has one (same options): all take part
            self._cka.sync(group, allow_empty=True)
        return self

    def compute(self) -> dict:
        """Scores per layer (float64):

        * ``"nis"``: two-view NIS_2 when a second view was given, else one-sided NIS_1;
        * ``"nis_one_sided"``: NIS_1 = 1 - E||f(Tx) - f(x)||² / (2 tr Cov f);
        * ``"nis_two_view"``: NIS_2, or None;
        * ``"cka"``: debiased CKA(f(X), f(TX)) per layer, or None;
        * ``"per_unit"``: list of ``(d_l,)`` per-unit NIS (two-view if available), or None;
        * ``"layers"``: layer names.
        """
        self._require_data("compute")
        n = self.n.item()
        if n < 2:
            raise ValueError("NIS needs at least 2 samples in total (the covariance divides by n - 1)")
        # per-unit unbiased variance, from the shifted sums (exactly 0 for a constant unit)
        var = (self.s_ff - self.s_f ** 2 / n).clamp_min(0) / (n - 1)
        names = self.names or [f"layer[{i}]" for i in range(len(self.dims))]
        bounds = torch.tensor([0] + list(self.dims)).cumsum(0).tolist()

        def per_layer(v):
            return torch.stack([v[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])

        den = 2.0 * per_layer(var)
        nis1 = _ratio(per_layer(self.s_d1) / n, den, names, "NIS")
        nis2 = _ratio(per_layer(self.s_d2) / n, den, names, "NIS") if self.two_view else None
        out = {"layers": names, "nis_one_sided": nis1, "nis_two_view": nis2,
               "nis": nis2 if self.two_view else nis1, "cka": None, "per_unit": None}
        if self.per_unit:
            d = (self.s_d2 if self.two_view else self.s_d1) / n
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConstantLayerWarning)  # dead units -> NaN, documented
                pu = _ratio(d, 2.0 * var, [str(i) for i in range(var.numel())], "NIS")
            out["per_unit"] = [pu[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if self._cka is not None:
            out["cka"] = self._cka.compute().diagonal().clone()
        return out


def normalized_invariance(f_t, f_t2, f_ref, *, per_unit: bool = False):
    """One-shot NIS per layer (METRICS.md §3.5).

    Args:
        f_t: features of T(x): a ``(n, ...)`` tensor, or a list/dict of them (one per layer).
        f_t2: features of an independent draw T'(x) (two-view NIS_2), or None for the
            one-sided NIS_1 (distance from the untransformed features).
        f_ref: features of the untransformed inputs, paired row by row.
        per_unit: return ``(layer scores, [per-unit scores])`` instead.

    Returns:
        a float64 tensor ``(L,)`` (a 0-d tensor for a single tensor input); NaN, with a
        :class:`ConstantLayerWarning`, for layers constant over ``f_ref``.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 5)
        >>> float(normalized_invariance(x, x.clone(), x))
        1.0
    """
    single = isinstance(f_ref, torch.Tensor)
    acc = InvarianceAccumulator(per_unit=per_unit, cka=False)
    wrap = (lambda f: [f] if isinstance(f, torch.Tensor) else f) if single else (lambda f: f)
    acc.update(wrap(f_t), None if f_t2 is None else wrap(f_t2), wrap(f_ref))
    res = acc.compute()
    nis = res["nis"][0] if single else res["nis"]
    if per_unit:
        return nis, (res["per_unit"][0] if single else res["per_unit"])
    return nis


def invariance_curve(features, batches, transforms, *, two_view: bool | None = None, cka: bool = True) -> dict:
    """NIS (and CKA invariance) per layer over a sweep of transform magnitudes.

    Args:
        features: callable ``x -> list/dict of (b, ...) layer features`` (e.g. a model
            wrapped with forward hooks), run under ``torch.no_grad()``.
        batches: iterable of input batches (tensors, or tuples whose first item is the input).
        transforms: a list of transforms (e.g. ``hierfast.transforms.sweep(Rotate, [0, 5, 10])``),
            or a dict ``name -> list`` for several families.
        two_view: None (default): per transform, by the rule of
            :func:`hierfast.transforms._base.scored_two_view` — a deterministic transform
            (``deterministic = True``, e.g. GaussianBlur; NIS_2 would be 1 by construction)
            gets the one-sided NIS_1 against f(x), the magnitude-sweep score of METRICS.md
            §3.5; a random one NIS_2 from two independent draws T, T' per batch. True /
            False force NIS_2 / NIS_1 for every transform.

    Returns:
        ``{name: {"magnitude": (M,), "nis": (M, L), "cka": (M, L) or None, "two_view": [M bools]
        (which score each transform got), "layers": [...]}}``
        (name ``"transform"`` when a plain list was given). One pass over ``batches``.
    """
    from ..transforms import as_transform
    from ..transforms._base import scored_two_view

    if two_view is not None and not isinstance(two_view, bool):
        raise TypeError(f"two_view must be None (per transform), True or False, got {two_view!r}")
    families = transforms if isinstance(transforms, dict) else {"transform": transforms}
    families = {k: [as_transform(t) for t in v] for k, v in families.items()}
    if not families or any(len(v) == 0 for v in families.values()):
        raise ValueError("transforms must hold at least one transform per family")
    accs = {k: [InvarianceAccumulator(cka=cka) for _ in v] for k, v in families.items()}
    views = {k: [scored_two_view(t) if two_view is None else two_view for t in v] for k, v in families.items()}
    with torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            f_ref = features(x)
            for k, ts in families.items():
                for t, acc, two in zip(ts, accs[k], views[k]):
                    acc.update(features(t(x)), features(t(x)) if two else None, f_ref)
    out = {}
    for k, ts in families.items():
        if not accs[k][0].initialized:
            raise ValueError("batches was empty: feed at least one batch")
        res = [a.compute() for a in accs[k]]
        out[k] = {"magnitude": torch.tensor([float(t.magnitude) for t in ts], dtype=torch.float64),
                  "nis": torch.stack([r["nis"] for r in res]),
                  "cka": torch.stack([r["cka"] for r in res]) if cka else None,
                  "two_view": views[k], "layers": res[0]["layers"]}
    return out
