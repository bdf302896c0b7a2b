"""Transforms of token-id sequences ``(N, L)`` (integer tensors), one draw per sample.

Lengths are kept (so batches stay rectangular): dropped tokens are replaced by a mask
token, or deleted and the row's non-pad slots re-packed, the freed ones filled with the
pad token. Tokens equal to ``pad_token_id`` are never touched: they stay where they are.
Magnitude 0 is exactly the identity (as is LocalShuffle with k <= 1). Pool the layer features over tokens (mean, last
or CLS) before invariance statistics (METRICS.md §3.8).
"""
from __future__ import annotations

import torch

from ._base import Transform, check_magnitude


class SequenceTransform(Transform):
    def __init__(self, *, pad_token_id: int | None = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
            raise TypeError(f"pad_token_id must be an int or None, got {type(pad_token_id).__name__}")
        self.pad_token_id = pad_token_id

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"x must be token ids of shape (N, L), got shape {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x must hold integer token ids, got {x.dtype}")

    def _is_identity(self) -> bool:
        return self.magnitude == 0.0

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return torch.zeros_like(x, dtype=torch.bool)
        return x == self.pad_token_id


class TokenMask(SequenceTransform):
    """Replace each (non-pad) token by ``mask_token_id`` with probability ``magnitude``."""

    def __init__(self, magnitude: float, *, mask_token_id: int, pad_token_id: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(pad_token_id=pad_token_id, seed=seed)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
            raise TypeError(f"mask_token_id must be an int token id, got {type(mask_token_id).__name__}")
        self.magnitude = check_magnitude(magnitude, "magnitude (masking probability)", high=1.0)
        self.mask_token_id = mask_token_id

    def _draw_is_fixed(self) -> bool:
        return self.magnitude in (0.0, 1.0)  # at 1 every non-pad token is masked

    def _apply(self, x, g):
        hit = torch.rand(x.shape, generator=g, device=x.device) < self.magnitude
        return x.masked_fill(hit & ~self._pad(x), self.mask_token_id)


class TokenDropout(SequenceTransform):
    """Delete each (non-pad) token with probability ``magnitude`` (EDA "random
    deletion", Wei & Zou 2019); survivors keep their order and fill the row's non-pad
    slots from the left, the slots left over get ``pad_token_id``. Pad tokens stay in
    place (left padding stays left padding)."""

    def __init__(self, magnitude: float, *, pad_token_id: int, seed: int = 0) -> None:
        if pad_token_id is None:
            raise ValueError("TokenDropout needs pad_token_id to fill the deleted positions at the row end "
                             "(or use TokenMask to keep the length)")
        super().__init__(pad_token_id=pad_token_id, seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (deletion probability)", high=1.0)

    def _draw_is_fixed(self) -> bool:
        return self.magnitude in (0.0, 1.0)  # at 1 every non-pad token is deleted

    def _apply(self, x, g):
        n, length = x.shape
        pad = self._pad(x)
        keep = (torch.rand(x.shape, generator=g, device=x.device) >= self.magnitude) & ~pad
        pos = torch.arange(length, device=x.device).expand(n, length)
        # sources: kept tokens in order, then the dropped ones, then the pads (stable sort)
        rank = torch.where(keep, 0, torch.where(pad, 2, 1)).to(torch.int8)
        src = torch.sort(rank, dim=1, stable=True).indices
        vals = torch.gather(x, 1, src).masked_fill(pos >= keep.sum(dim=1, keepdim=True), self.pad_token_id)
        # destinations: the non-pad slots in order, then the pad slots, as in LocalShuffle
        dst = torch.sort(pad.to(torch.int8), dim=1, stable=True).indices
        return torch.empty_like(x).scatter_(1, dst, vals)


class LocalShuffle(SequenceTransform):
    """Shuffle tokens locally: token i gets the key i + U[0, k) and the row is sorted
    by key, so no token moves more than ceil(k)-1 places (k-1 for integer k; Lample et al.
    2018, "Unsupervised Machine Translation Using Monolingual Corpora Only", word-shuffle
    noise). ``magnitude`` = k >= 0; k <= 1 is the identity. Pad tokens stay in place."""

    def __init__(self, magnitude: float, *, pad_token_id: int | None = None, seed: int = 0) -> None:
        super().__init__(pad_token_id=pad_token_id, seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (shuffle window k)")

    def _is_identity(self) -> bool:
        return self.magnitude <= 1.0  # keys i + U[0, k) with k <= 1 never cross

    def _apply(self, x, g):
        n, length = x.shape
        pad = self._pad(x)
        i = torch.arange(length, device=x.device, dtype=torch.float64).expand(n, length)
        keys = i + torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float64) * self.magnitude
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
        src = torch.sort(torch.where(pad, inf, keys), dim=1, stable=True).indices  # non-pad by key, then pads
        dst = torch.sort(torch.where(pad, inf, i), dim=1, stable=True).indices     # non-pad slots, then pads
        out = torch.empty_like(x)
        return out.scatter_(1, dst, torch.gather(x, 1, src))
