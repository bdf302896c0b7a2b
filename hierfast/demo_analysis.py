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


def measure(trained: nn.Module, initial: nn.Module, x: torch.Tensor, y: torch.Tensor, *, layers: list[str],
            quick: bool = False, seed: int = 0, progress: bool = True, batch: int = 60) -> dict:
    """Analysis dict (:mod:`hierfast.report.schema`) of ``trained`` with ``initial`` as reference."""
    data = _batches(x, y, batch)
    res = analyze(trained, data, layers=layers, stats={"cka": {}, "sparsity": {}, "invariance": {"seed": seed}},
                  progress=progress)
    versus = analyze(trained, data, layers=layers, compare_to=initial, stats=("cka",), progress=progress)
    return {
        "layers": list(res.layers),
        "cka": res.cka,
        "cka_vs_reference": versus.cka,
        "reference_name": "initialisation",
        "sparsity": res.sparsity,
        "invariance": res.invariance,
    }
