"""Seeded width reduction of a layer before probe statistics (``max_dim``).

The probe's statistics grow as d^2 per layer, so layers wider than ``max_dim`` are
reduced first, by a fixed (data-independent, seeded) map that is the same for every
batch:

* conv maps ``(n, C, H, W)``: adaptive average pooling to the largest grid
  ``h' x w'`` (same aspect, h' <= H, w' <= W) with ``C h' w' <= max_dim`` — the
  spatial pooling of Nguyen et al. 2021's probes; if even ``C`` channels exceed
  ``max_dim`` the pooled map is then projected as below;
* anything else, flattened to ``(n, d)``: a count-sketch random projection
  (feature hashing, Weinberger et al. 2009): unit j goes to bucket h(j) with sign
  s(j), both drawn from ``torch.Generator(seed)``; it preserves inner products in
  expectation (a Johnson-Lindenstrauss map) and needs O(d) memory, not O(d max_dim).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Reducer:
    """Maps ``(n, ...)`` features of one layer to at most ``max_dim`` columns (float64)."""

    def __init__(self, max_dim: int, seed: int = 0) -> None:
        if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
            raise ValueError(f"max_dim must be a positive int, got {max_dim!r}")
        self.max_dim, self.seed = max_dim, seed
        self._sketch: dict = {}

    def method(self, shape: tuple[int, ...]) -> str:
        d = math.prod(shape)
        if d <= self.max_dim:
            return "none"
        if len(shape) == 3 and shape[0] <= self.max_dim:
            return "avgpool"
        return "avgpool+sketch" if len(shape) == 3 else "sketch"

    def _grid(self, c: int, h: int, w: int) -> tuple[int, int]:
        best = (1, 1)
        for hh in range(1, h + 1):  # largest grid under the budget, aspect kept
            ww = max(1, min(w, round(hh * w / h)))
            if c * hh * ww <= self.max_dim:
                best = (hh, ww)
        return best

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        shape = tuple(x.shape[1:])
        how = self.method(shape)
        if how == "none":
            return x.reshape(n, -1).to(torch.float64)
        if how.startswith("avgpool"):
            x = F.adaptive_avg_pool2d(x.to(torch.float64), self._grid(*shape))
        x = x.reshape(n, -1).to(torch.float64)
        if x.shape[1] <= self.max_dim:
            return x
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[1]
        key = (d, str(x.device))
        if key not in self._sketch:
            g = torch.Generator().manual_seed(self.seed)
            bucket = torch.randint(0, self.max_dim, (d,), generator=g)
            sign = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
            self._sketch[key] = (bucket.to(x.device), sign.to(x.device))
        bucket, sign = self._sketch[key]
        out = torch.zeros(x.shape[0], self.max_dim, dtype=torch.float64, device=x.device)
        return out.index_add_(1, bucket, x * sign)
