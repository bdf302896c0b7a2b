"""Seeded pseudo-random functions of an input's identity (its dataset index).

A probe's fold, its held-out split and its control label must depend on *which*
input a row is (so that every augmentation or re-visit of an input lands in the
same fold with the same control label, Hewitt & Liang 2019), not on batch order.
``uniform01(index, seed)`` hashes the int64 index with a 32-bit integer mixer
(Wellons' "lowbias32" constants) in plain torch int64 arithmetic, with every
product below 2^63 so nothing overflows; the result is identical on CPU and GPU.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = ((x >> 16) ^ x) * 0x7FEB352D & _M32
    x = ((x >> 15) ^ x) * 0x846CA68B & _M32
    return (x >> 16) ^ x


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 tensor of 32-bit hashes of ``index`` (int64) under ``seed``."""
    idx = index.to(torch.int64)
    h = int(_mix32(torch.tensor((seed + 0x9E3779B9) & _M32)).item())  # seed -> 32-bit key
    h = _mix32((idx & _M32) ^ h)
    return _mix32(((idx >> 32) & _M32) ^ h)


def uniform01(index: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 in [0, 1), a fixed pseudo-random function of (index, seed)."""
    return hash32(index, seed).to(torch.float64) / 4294967296.0


def check_index(index, n: int, device) -> torch.Tensor:
    """Validate ``index`` (identity of each of ``n`` rows): an integer tensor or sequence."""
    t = torch.as_tensor(index, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"index must hold integer sample ids (dataset indices), got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"index has shape {tuple(t.shape)}; expected ({n},), one id per row")
    return t.to(torch.int64)
