"""Receptive field of a conv layer's units in input pixels.

Two methods:

- ``"analytic"``: when the path from the input to the layer is a chain of ``nn.Sequential``
  children (nested Sequentials are flattened), walk it composing each Conv/Pool's kernel,
  stride, padding and dilation; shape-preserving elementwise layers (activations,
  BatchNorm, Dropout, Identity) pass through. Exact.
- ``"gradient"``: otherwise, the support of the input gradient of one unit (summed over the
  layer's channels, over a few random inputs) at two neighbouring positions gives size,
  stride and offset. Approximate: max-pooling and dead ReLUs can shrink the support.

A unit at output position ``i`` (per axis) sees input pixels ``[i*jump + start,
i*jump + start + size - 1]`` (before clipping to the image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_PASS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
         nn.Dropout2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.Hardswish, nn.Mish, nn.Softplus,
         nn.PReLU, nn.ReLU6, nn.LocalResponseNorm)


@dataclass(frozen=True)
class ReceptiveField:
    """Per-axis (rows, cols) ``size``, ``jump`` (stride in pixels) and ``start`` (offset of
    unit 0, may be negative because of padding); ``method``: ``"analytic"`` or ``"gradient"``."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]
    method: str

    def boxes(self, row: torch.Tensor, col: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(..., 4)`` int64 boxes ``(top, left, bottom, right)`` (bottom/right exclusive),
        clipped to the ``height`` x ``width`` input; -1 where ``row`` is -1."""
        top = row * self.jump[0] + self.start[0]
        left = col * self.jump[1] + self.start[1]
        box = torch.stack([top.clamp(0, height), left.clamp(0, width),
                           (top + self.size[0]).clamp(0, height), (left + self.size[1]).clamp(0, width)], -1)
        return torch.where((row < 0).unsqueeze(-1), torch.full_like(box, -1), box)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _chain(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """Leaves of a (nested) Sequential in execution order, or None if not a chain."""
    if not isinstance(model, nn.Sequential):
        return None
    out = []
    for n, m in model.named_children():
        name = f"{prefix}{n}"
        sub = _chain(m, name + ".") if isinstance(m, nn.Sequential) else None
        out.extend(sub if sub is not None else [(name, m)])
    return out


def analytic(model: nn.Module, layer: str) -> ReceptiveField | None:
    """Exact receptive field along a Sequential chain, or None where the walk does not apply."""
    chain = _chain(model)
    if chain is None:
        return None
    mine = [i for i, (n, _) in enumerate(chain) if n == layer or n.startswith(layer + ".")]
    if not mine:
        return None
    size, jump, start = [1, 1], [1, 1], [0, 0]
    for name, m in chain[: mine[-1] + 1]:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride is not None else m.kernel_size)
            d = _pair(getattr(m, "dilation", 1))
            p = m.padding
            if isinstance(p, str):  # conv padding="same" / "valid"
                p = tuple(dd * (kk - 1) // 2 for dd, kk in zip(d, k)) if p == "same" else (0, 0)
            p = _pair(p)
            for a in range(2):
                start[a] -= p[a] * jump[a]
                size[a] += (k[a] - 1) * d[a] * jump[a]
                jump[a] *= s[a]
        elif not isinstance(m, _PASS):
            return None  # Linear, Flatten, custom blocks: not a pixel chain, use the probe
    return ReceptiveField(tuple(size), tuple(jump), tuple(start), "analytic")


def _support(grad: torch.Tensor) -> tuple[list[int], list[int]]:
    nz = grad.abs().sum(dim=(0, 1)) > 0  # (H, W)
    rows = torch.nonzero(nz.any(1)).flatten()
    cols = torch.nonzero(nz.any(0)).flatten()
    if rows.numel() == 0:
        raise ValueError("receptive-field probe: the layer's gradient with respect to the input is zero")
    return [int(rows[0]), int(cols[0])], [int(rows[-1]), int(cols[-1])]


def gradient_probe(model: nn.Module, module: nn.Module, x: torch.Tensor, seed: int = 0) -> ReceptiveField:
    """Receptive field from input-gradient support (see module docstring). ``x``: one
    ``(N, C, H, W)`` float batch of the data (only its shape/dtype/device are used)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn((4,) + tuple(x.shape[1:]), generator=g, dtype=torch.float32).to(x.device, x.dtype)
    probe.requires_grad_(True)
    store = {}
    h = module.register_forward_hook(lambda m, a, o: store.__setitem__("out", o if torch.is_tensor(o) else o[0]))
    try:
        with torch.enable_grad():
            model(probe)
    finally:
        h.remove()
    out = store["out"]
    H, W = out.shape[-2:]
    i0, j0 = max((H - 1) // 2, 0), max((W - 1) // 2, 0)
    lo, hi = [], []
    for di in (0, 1):
        i, j = min(i0 + di, H - 1), min(j0 + di, W - 1)
        gr, = torch.autograd.grad(out[:, :, i, j].sum(), probe, retain_graph=True)
        a, b = _support(gr)
        lo.append((a, (i, j)))
        hi.append(b)
    (a0, (i, j)), (a1, (i1, j1)) = lo
    jump = tuple(max((a1[t] - a0[t]) // max((i1, j1)[t] - (i, j)[t], 1), 1) if (i1, j1)[t] != (i, j)[t] else 1
                 for t in range(2))
    size = tuple(hi[0][t] - a0[t] + 1 for t in range(2))
    start = tuple(a0[t] - (i, j)[t] * jump[t] for t in range(2))
    return ReceptiveField(size, jump, start, "gradient")
