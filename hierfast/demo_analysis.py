"""The measurements of ``hierfast demo``: every statistic, for the trained and the initial network.

Kept apart from the training code so ``hierfast analyze --report`` can reuse the shape of
the analysis dict (:mod:`hierfast.report.schema`).
"""
from __future__ import annotations

import torch
from torch import nn

from .capture import analyze


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y) - size + 1, size)]


def demo_transforms(quick: bool, seed: int) -> dict:
    """Translation (zero-padded, pixels), rotation (degrees), Gaussian noise (std of the
    standardised pixels) and blur (sigma, pixels): two magnitudes each (one with --quick)."""
    from . import transforms as T

    mags = {"translate": [1, 2], "rotate": [10, 25], "noise": [0.25, 0.5], "blur": [0.5, 1.0]}
    make = {"translate": lambda m, seed: T.Translate(m, mode="zeros", seed=seed), "rotate": T.Rotate,
            "noise": T.GaussianNoise, "blur": T.GaussianBlur}
    return {name: [make[name](m, seed=seed + i) for m in (ms[:1] if quick else ms)]
            for i, (name, ms) in enumerate(mags.items())}


def _side(v, side: str):
    return v[side] if isinstance(v, dict) and side in v else v


def measure(trained: nn.Module, initial: nn.Module, x: torch.Tensor, y: torch.Tensor, *, layers: list[str],
            quick: bool = False, seed: int = 0, progress: bool = True, batch: int = 60,
            transforms: dict | None = None, n_classes: int = 10, sparsity: bool = True) -> dict:
    """Analysis dict (:mod:`hierfast.report.schema`) of ``trained``, with ``initial`` as the
    reference: one pass for trained x initial (CKA between the two, and every other statistic
    for both networks), one pass for the trained network's layer x layer CKA.

    ``x`` is ``(N, ...)`` inputs (images, or token ids for the text demo), ``y`` ``(N,)``
    labels; ``transforms`` the invariance families (default: :func:`demo_transforms`);
    ``sparsity=False`` skips the fraction of active units (meaningless after LayerNorm)."""
    data = _batches(x, y, batch)
    stats = {"cka": {}, "invariance": {"transforms": transforms or demo_transforms(quick, seed), "seed": seed},
             "dimension": {"resamples": 3 if quick else 10, "seed": seed},
             "probe": {"seed": seed, "n_classes": n_classes, "test_fraction": 0.3,
                       "max_dim": 256 if quick else 512}}
    if sparsity:
        stats["sparsity"] = {}
    both = analyze(trained, data, layers=layers, compare_to=initial, stats=stats, progress=progress)
    within = analyze(trained, data, layers=layers, stats=("cka",), progress=progress)
    probe = _side(both.probe, "a")
    out = {
        "layers": list(within.layers),
        "cka": within.cka,
        "cka_vs_reference": both.cka,
        "reference_name": "initialisation",
        "invariance": _side(both.invariance, "a"),
        "probe": {k: probe[k] for k in ("accuracy", "control", "selectivity", "chance")},
        "dimension": {k: v for k, v in _side(both.dimension, "a").items() if k != "effective_rank"},
        "reference": {"invariance": _side(both.invariance, "b"), "probe": _side(both.probe, "b"),
                      "dimension": _side(both.dimension, "b")},
        "n_samples": within.n_samples,
    }
    if sparsity:
        out["sparsity"] = _side(both.sparsity, "a")
        out["reference"]["sparsity"] = _side(both.sparsity, "b")
    return out
