"""Statistics that ``analyze`` provides besides ``"cka"`` (see :mod:`.statistics` for the protocol).

* ``"sparsity"``: fraction of active (> 0) feature values per layer.
* ``"dimension"``: TwoNN intrinsic dimension, participation ratio and effective rank per layer.
* ``"probe"``: linear-probe accuracy, control accuracy and selectivity per layer.
* ``"invariance"``: normalised invariance score (and CKA invariance) per layer and transform
  magnitude, from extra forwards of transformed inputs (:class:`InvarianceStatistic`).
"""
from __future__ import annotations

import torch

from .statistics import register_statistic


class SparsityStatistic:
    """Fraction of feature values > 0 per layer (after the capture's reduction), summed over
    the stream in float64. ``compute()`` -> ``(La,)`` tensor, or ``{"a": (La,), "b": (Lb,)}``
    with ``compare_to``."""

    def __init__(self, layers_a, layers_b=None) -> None:
        self.layers_a, self.layers_b = list(layers_a), (list(layers_b) if layers_b is not None else None)
        n = len(self.layers_a) + (len(self.layers_b) if self.layers_b else 0)
        self.active = torch.zeros(n, dtype=torch.float64)
        self.total = torch.zeros(n, dtype=torch.float64)

    def update_batch(self, feats_a, feats_b, batch) -> None:
        feats = [feats_a[k] for k in self.layers_a] + ([feats_b[k] for k in self.layers_b] if self.layers_b else [])
        active = torch.stack([(f > 0).sum(dtype=torch.float64).cpu() for f in feats])
        self.active += active
        self.total += torch.tensor([float(f.numel()) for f in feats], dtype=torch.float64)

    def compute(self):
        if not bool((self.total > 0).all()):
            raise ValueError("sparsity: no data was seen")
        frac = self.active / self.total
        if self.layers_b is None:
            return frac
        la = len(self.layers_a)
        return {"a": frac[:la], "b": frac[la:]}

    def state_dict(self) -> dict:
        return {"active": self.active.clone(), "total": self.total.clone()}

    def load_state_dict(self, state: dict) -> "SparsityStatistic":
        self.active, self.total = state["active"].clone(), state["total"].clone()
        return self

    def sync(self, group=None) -> "SparsityStatistic":
        import torch.distributed as dist

        both = torch.stack([self.active, self.total])
        if dist.get_backend(group) == "nccl":
            both = both.cuda()
        dist.all_reduce(both, group=group)
        self.active, self.total = both[0].cpu(), both[1].cpu()
        return self


register_statistic("sparsity", SparsityStatistic)


def default_image_transforms(seed: int = 0) -> dict:
    """Translation (zero-padded, pixels), rotation (degrees), Gaussian noise (std, in input
    units) and Gaussian blur (sigma, pixels) at three magnitudes each, 0 first (the baseline)."""
    from .. import transforms as T

    return {
        "translate": T.sweep(T.Translate, [0, 1, 2], mode="zeros", seed=seed),
        "rotate": T.sweep(T.Rotate, [0, 10, 25], seed=seed + 1),
        "noise": T.sweep(T.GaussianNoise, [0, 0.25, 0.5], seed=seed + 2),
        "blur": T.sweep(T.GaussianBlur, [0, 0.5, 1.0], seed=seed + 3),
    }


class InvarianceStatistic:
    """Invariance of every layer to input transforms (METRICS.md §3; hierfast.stats.InvarianceAccumulator).

    Per batch and per transform, two independent draws T(x), T'(x) are run through the
    model(s) (``batch.forward``) and NIS_2 = 1 - E||f(Tx) - f(T'x)||^2 / (2 tr Cov f) is
    accumulated against the untransformed features; a transform that declares
    ``deterministic = True`` (GaussianBlur; T = T', so NIS_2 would be 1 by construction) gets
    one forward and the one-sided NIS_1 = 1 - E||f(Tx) - f(x)||^2 / (2 tr Cov f) instead
    (:func:`hierfast.transforms._base.scored_two_view`, decided once per transform). ``cka=True``
    adds debiased CKA(f(X), f(TX)).
    The draws of batch k come from a generator seeded by (seed, k, transform, view), so a
    resumed run draws exactly what the uninterrupted run drew.

    Options: ``transforms`` — ``{family: [Transform, ...]}`` (a sweep over magnitudes;
    default :func:`default_image_transforms`), ``cka`` (default False), ``seed``.

    ``compute()`` -> ``{family: {"magnitudes": [M], "score": (M, L), "cka": (M, L) | None}}``
    (``{"a": ..., "b": ...}`` with ``compare_to``). Costs 2 forwards per transform per batch.
    """

    def __init__(self, layers_a, layers_b=None, *, transforms: dict | None = None, cka: bool = False,
                 seed: int = 0) -> None:
        from ..stats import InvarianceAccumulator
        from ..transforms import as_transform

        fams = default_image_transforms(seed) if transforms is None else transforms
        if not isinstance(fams, dict) or not fams or any(not isinstance(v, (list, tuple)) or not v
                                                         for v in fams.values()):
            raise ValueError("invariance: transforms must be a non-empty dict {family: [transform, ...]}, "
                             "e.g. {'rotate': hierfast.transforms.sweep(Rotate, [0, 10, 20])}")
        self.families = {k: [as_transform(t) for t in v] for k, v in fams.items()}
        self.layers_a, self.layers_b = list(layers_a), (list(layers_b) if layers_b is not None else None)
        self.seed, self.cka = int(seed), bool(cka)
        sides = ("a", "b") if self.layers_b is not None else ("a",)
        self.accs = {(side, k, i): InvarianceAccumulator(cka=self.cka)
                     for side in sides for k, ts in self.families.items() for i in range(len(ts))}

    def _generator(self, index: int, family: int, step: int, view: int, device) -> torch.Generator:
        """The stream of batch ``index``, transform ``step`` of the ``family``-th family, ``view``.

        Seeded by a hash of (statistic seed, family name, step, the transform's own seed,
        batch index, view): collision-free (no arithmetic packing to overflow into a
        neighbour), the transform's ``seed=`` counts, and a transform's draws do not move
        when other families are added or reordered, nor with the batch order."""
        import hashlib

        name = list(self.families)[family]
        key = repr((self.seed, str(name), step, int(getattr(self.families[name][step], "seed", 0)), index, view))
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1)
        return g

    def update_batch(self, feats_a, feats_b, batch) -> None:
        from ..transforms._base import scored_two_view

        x = batch.inputs
        if not isinstance(x, torch.Tensor):
            raise TypeError("invariance: the batches' inputs must be tensors (images) to transform, got "
                            f"{type(x).__name__}; pass transforms that take your input type via Lambda, or "
                            "drop 'invariance' from stats")
        for fi, (k, ts) in enumerate(self.families.items()):
            for i, t in enumerate(ts):
                # one view (NIS_1) or two (NIS_2) by the transform's declared determinism, never
                # by comparing this batch's draws: a random flip whose two draws happen to be
                # equal on one batch must not switch the accumulator's layout mid-run
                n_views = 2 if scored_two_view(t) else 1
                xt = [t(x, generator=self._generator(batch.index, fi, i, v, x.device)) for v in range(n_views)]
                views = [batch.forward(v) for v in xt] + [None] * (2 - n_views)
                for side, layers, ref, j in (("a", self.layers_a, feats_a, 0), ("b", self.layers_b, feats_b, 1)):
                    if layers is None:
                        continue
                    self.accs[(side, k, i)].update([views[0][j][n] for n in layers],
                                                   None if views[1] is None else [views[1][j][n] for n in layers],
                                                   [ref[n] for n in layers])

    def compute(self):
        out = {}
        for side in ("a", "b") if self.layers_b is not None else ("a",):
            fam = {}
            for k, ts in self.families.items():
                res = [self.accs[(side, k, i)].compute() for i in range(len(ts))]
                fam[k] = {"magnitudes": [float(t.magnitude) for t in ts],
                          "score": torch.stack([r["nis"] for r in res]),
                          "cka": torch.stack([r["cka"] for r in res]) if self.cka else None}
            out[side] = fam
        return out["a"] if self.layers_b is None else out

    def state_dict(self) -> dict:
        return {"|".join(map(str, key)): acc.state_dict() for key, acc in self.accs.items()}

    def load_state_dict(self, state: dict) -> "InvarianceStatistic":
        for key, acc in self.accs.items():
            acc.load_state_dict(state["|".join(map(str, key))])
        return self

    def sync(self, group=None) -> "InvarianceStatistic":
        for acc in self.accs.values():
            acc.sync(group)
        return self


# tr Cov f needs two rows; the optional debiased CKA four
register_statistic("invariance", InvarianceStatistic, min_samples=lambda opts: 4 if opts.get("cka") else 2)


class ProbeStatistic:
    """Linear probes per layer (:class:`hierfast.stats.ProbeAccumulator`): ridge on one-hot
    labels, a seeded held-out split by sample identity (position in the stream), a control
    task and the selectivity. Needs labelled batches (``(x, y)`` tuples or a dict with
    ``labels``). Options are ProbeAccumulator's (``test_fraction``, ``max_test``, ``max_dim``,
    ``alphas``, ``control``, ``seed``, ``n_classes``).

    ``compute()`` -> ``{"accuracy": (L,), "control": (L,), "selectivity": (L,), "alpha": (L,),
    "chance": float, "n_train": int, "n_test": int}`` (``{"a": ..., "b": ...}`` with compare_to).
    Under torch.distributed, give each rank a disjoint shard: rows are identified by their
    position in the rank's stream offset by ``rank * 2**40``.
    """

    def __init__(self, layers_a, layers_b=None, **options) -> None:
        from ..stats import ProbeAccumulator

        self.layers_a, self.layers_b = list(layers_a), (list(layers_b) if layers_b is not None else None)
        self.accs = {"a": ProbeAccumulator(**options)}
        if self.layers_b is not None:
            self.accs["b"] = ProbeAccumulator(**options)
        self.offset = 0
        self._options = options

    def update_batch(self, feats_a, feats_b, batch) -> None:
        if batch.labels is None:
            raise ValueError("probe: the batches carry no labels; feed (x, y) tuples (or dicts with 'labels') to "
                             "probe, or drop 'probe' from stats")
        y = batch.labels.reshape(-1)
        n = y.shape[0]
        idx = torch.arange(self.offset, self.offset + n, device=y.device) + _rank_offset()
        self.accs["a"].update({k: feats_a[k] for k in self.layers_a}, y, idx)
        if self.layers_b is not None:
            self.accs["b"].update({k: feats_b[k] for k in self.layers_b}, y, idx)
        self.offset += n

    def compute(self):
        return _compute_sides(self.accs)

    def state_dict(self) -> dict:
        return {"offset": self.offset, **{side: acc.state_dict() for side, acc in self.accs.items()}}

    def load_state_dict(self, state: dict) -> "ProbeStatistic":
        self.offset = state["offset"]
        for side, acc in self.accs.items():
            acc.load_state_dict(state[side])
        return self

    def sync(self, group=None) -> "ProbeStatistic":
        for acc in self.accs.values():
            acc.sync(group)
        return self


def _compute_sides(accs: dict):
    """Each side's accumulator result without its ``layers`` key (the engine names the layers):
    the one result, or ``{"a": ..., "b": ...}`` with compare_to."""
    out = {}
    for side, acc in accs.items():
        r = acc.compute()
        r.pop("layers")
        out[side] = r
    return out["a"] if len(out) == 1 else out


def _rank_offset() -> int:
    import torch.distributed as dist

    return dist.get_rank() * 2 ** 40 if dist.is_available() and dist.is_initialized() else 0


register_statistic("probe", ProbeStatistic)


class DimensionStatistic:
    """Dimensionality per layer (:class:`hierfast.stats.DimensionAccumulator`): TwoNN on a
    seeded reservoir sample, participation ratio and effective rank from streamed covariance
    sums. Options: ``reservoir``, ``max_dim``, ``resamples``, ``fraction``, ``seed``. Under
    torch.distributed the ranks' reservoirs are concatenated and their sums added.

    ``compute()`` -> ``{"twonn", "twonn_sd", "participation_ratio", "effective_rank"}`` of ``(L,)``
    (``{"a": ..., "b": ...}`` with compare_to).
    """

    def __init__(self, layers_a, layers_b=None, **options) -> None:
        from ..stats import DimensionAccumulator

        self.layers = {"a": list(layers_a)}
        if layers_b is not None:
            self.layers["b"] = list(layers_b)
        self.accs = {side: DimensionAccumulator(**options) for side in self.layers}

    def update_batch(self, feats_a, feats_b, batch) -> None:
        for side, feats in (("a", feats_a), ("b", feats_b)):
            if side in self.accs:
                self.accs[side].update({k: feats[k] for k in self.layers[side]})

    def compute(self):
        return _compute_sides(self.accs)

    def state_dict(self) -> dict:
        return {side: acc.state_dict() for side, acc in self.accs.items()}

    def load_state_dict(self, state: dict) -> "DimensionStatistic":
        for side, acc in self.accs.items():
            acc.load_state_dict(state[side])
        return self

    def sync(self, group=None) -> "DimensionStatistic":
        for acc in self.accs.values():  # the accumulator's own sync (one copy of the gather-and-merge)
            acc.sync(group)
        return self


register_statistic("dimension", DimensionStatistic)
