"""Statistics that ``analyze`` provides besides ``"cka"`` (see :mod:`.statistics` for the protocol).

* ``"sparsity"``: fraction of active (> 0) feature values per layer.
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
