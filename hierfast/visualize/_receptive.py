"""Receptive field of a conv layer's units in input pixels.

Two methods:

- ``"analytic"``: when the path from the input to the layer is a chain of ``nn.Sequential``
  children (nested Sequentials are flattened), walk it composing each Conv/Pool's kernel,
  stride, padding and dilation; shape-preserving elementwise layers (activations,
  BatchNorm, Dropout, Identity) pass through. Exact.
- ``"gradient"``: otherwise, the support of the input gradient of one unit (summed over the
  layer's channels, random input) at two neighbouring positions gives size,
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

    def boxes(self, row: torch.Tensor, col: torch.Tensor, height, width) -> torch.Tensor:
        """``(..., 4)`` int64 boxes ``(top, left, bottom, right)`` (bottom/right exclusive),
        clipped to the ``height`` x ``width`` input (ints, or tensors like ``row``: one
        image size per unit); -1 where ``row`` or ``height`` is -1."""
        height = torch.as_tensor(height, dtype=torch.int64, device=row.device)
        width = torch.as_tensor(width, dtype=torch.int64, device=row.device)
        top = row * self.jump[0] + self.start[0]
        left = col * self.jump[1] + self.start[1]

        def clip(v, hi):
            return torch.minimum(v.clamp_min(0), hi)

        box = torch.stack([clip(top, height), clip(left, width), clip(top + self.size[0], height),
                           clip(left + self.size[1], width)], -1)
        return torch.where(((row < 0) | (height < 0)).unsqueeze(-1), torch.full_like(box, -1), box)


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


class _Stop(Exception):
    pass


def _probe_once(model, module, shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(shape, generator=g, dtype=torch.float32).to(device, dtype).requires_grad_(True)
    store = {}

    def hook(m, a, o):
        store["out"] = o if torch.is_tensor(o) else o[0]
        raise _Stop  # the layers above (a Flatten + Linear head) need not run, nor fit the size

    h = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            model(probe)
    except _Stop:
        pass
    finally:
        h.remove()
    out = store["out"]
    H, W = out.shape[-2:]
    i0, j0 = max((H - 1) // 2, 0), max((W - 1) // 2, 0)
    i1, j1 = min(i0 + 1, H - 1), min(j0 + 1, W - 1)
    # one backward for both units: sample 0 carries unit (i0, j0), sample 1 unit (i1, j1)
    # (eval mode: samples are independent)
    grad, = torch.autograd.grad(out[0, :, i0, j0].sum() + out[1, :, i1, j1].sum(), probe)
    lo0, hi0 = _support(grad[:1])
    lo1, _ = _support(grad[1:])
    return (i0, j0), (i1, j1), lo0, hi0, lo1


def gradient_probe(model: nn.Module, module: nn.Module, x: torch.Tensor, seed: int = 0,
                   max_side: int = 512) -> ReceptiveField:
    """Receptive field from input-gradient support (see module docstring). ``x``: one
    ``(N, C, H, W)`` float batch of the data (only its shape/dtype/device are used). The
    probe image is enlarged (x2, up to ``max_side``) while the support touches its border,
    so a field larger than the data's images is still measured (beyond ``max_side`` the
    size is a lower bound)."""
    side = [int(x.shape[2]), int(x.shape[3])]
    while True:
        (i0, j0), (i1, j1), lo0, hi0, lo1 = _probe_once(model, module, (2, x.shape[1], *side), x.dtype,
                                                        x.device, seed)
        touches = [lo0[t] == 0 or hi0[t] == side[t] - 1 for t in range(2)]
        if not any(touches) or max(side) * 2 > max_side:
            break
        side = [s * 2 if t else s for s, t in zip(side, touches)]
    pos0, pos1 = (i0, j0), (i1, j1)
    jump = tuple(max((lo1[t] - lo0[t]) // (pos1[t] - pos0[t]), 1) if pos1[t] != pos0[t] else 1 for t in range(2))
    size = tuple(hi0[t] - lo0[t] + 1 for t in range(2))
    start = tuple(lo0[t] - pos0[t] * jump[t] for t in range(2))
    return ReceptiveField(size, jump, start, "gradient")
