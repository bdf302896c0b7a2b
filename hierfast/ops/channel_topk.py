"""Per-channel spatial max (or mean) + running top-k merge: the kernel of
``hierfast.visualize.top_activating``.

Definition (the reference below): for a batch ``x`` (B, C, S) each channel ``c`` scores
every row ``x[b, c, :]`` — ``max`` with the *first* argmax, or ``mean`` (position -1) —
and keeps the ``k`` best rows seen so far, sorted by (score descending, dataset index
ascending), where the dataset index of row ``b`` is ``base + b``. Tie rule: lower
dataset index first, then (within a row) lower spatial index. Rows holding a NaN are
skipped and counted per channel in ``bad`` so that callers can raise.

State, updated in place: ``vals`` (C, k) float64 (``-inf`` in empty slots), ``idx``
(C, k) int64 (``-1`` = empty), ``pos`` (C, k) int64, ``bad`` (C,) int64. Fusing the
reduction with the merge means one read of the activations and no (B, C) temporary.
"""
from __future__ import annotations

import torch

from .. import _dtypes
from ..backends import Op
from ._launch import cpu_kernels, cuda_kernels, cuda_stream, on_device

_IN = _dtypes.FLOAT_DTYPES
OP = Op("channel_topk")
MODES = {"max": 0, "mean": 1}


def new_state(channels: int, k: int, device=None) -> dict:
    """Empty top-k state for ``channels`` lists of length ``k``."""
    return {"vals": torch.full((channels, k), float("-inf"), dtype=torch.float64, device=device),
            "idx": torch.full((channels, k), -1, dtype=torch.int64, device=device),
            "pos": torch.full((channels, k), -1, dtype=torch.int64, device=device),
            "bad": torch.zeros(channels, dtype=torch.int64, device=device)}


def channel_topk_reference(x, vals, idx, pos, bad, base: int, mode: int) -> None:
    """Plain-torch float64 definition (sort of old entries + this batch's scores)."""
    B, C, S = x.shape
    if B == 0:
        return
    k = vals.shape[1]
    x64 = x.to(torch.float64)
    nan_pos = torch.isnan(x64)
    nan = nan_pos.any(dim=2)  # (B, C)
    if mode == 0:
        # NaN -> -inf only: nan_to_num's default would also turn +-inf scores into +-DBL_MAX
        score, arg = x64.masked_fill(nan_pos, float("-inf")).max(dim=2)  # torch: first maximal index
    else:
        score = x64.mean(dim=2)
        nan = nan | torch.isnan(score)
        arg = torch.full_like(score, -1, dtype=torch.int64)
    bad += nan.sum(0)
    for c in range(C):
        keep = idx[c] >= 0
        good = ~nan[:, c]
        v = torch.cat([vals[c][keep], score[good, c]])
        i = torch.cat([idx[c][keep], base + torch.arange(B, device=x.device)[good]])
        p = torch.cat([pos[c][keep], arg[good, c]])
        order = torch.sort(i, stable=True).indices  # secondary key: index ascending
        order = order[torch.sort(-v[order], stable=True).indices]
        order = order[:k]
        n = order.numel()
        vals[c, :n], idx[c, :n], pos[c, :n] = v[order], i[order], p[order]


@OP.register("reference", devices=("cpu", "cuda"), dtypes=_IN)
def _reference(x, vals, idx, pos, bad, base, mode):
    channel_topk_reference(x, vals, idx, pos, bad, base, mode)


@OP.register("cpu", devices=("cpu",), dtypes=_IN)
def _cpu(x, vals, idx, pos, bad, base, mode):
    B, C, S = x.shape
    cpu_kernels().channel_topk(x.data_ptr(), _dtypes.code(x.dtype), B, C, S, *x.stride(), base, vals.shape[1],
                               mode, vals.data_ptr(), idx.data_ptr(), pos.data_ptr(), bad.data_ptr())


@OP.register("cuda", devices=("cuda",), dtypes=_IN)
def _cuda(x, vals, idx, pos, bad, base, mode):
    B, C, S = x.shape
    with torch.cuda.device(x.device):
        cuda_kernels().channel_topk(x.data_ptr(), _dtypes.code(x.dtype), B, C, S, *x.stride(), base,
                                    vals.shape[1], mode, vals.data_ptr(), idx.data_ptr(), pos.data_ptr(),
                                    bad.data_ptr(), cuda_stream(x))


@OP.register("triton", devices=("cpu", "cuda"), dtypes=_IN)
def _triton(x, vals, idx, pos, bad, base, mode):
    from ..kernels.channel_topk import channel_topk as kernel

    with on_device(x):
        kernel(x, vals, idx, pos, bad, base, mode)


def channel_topk(x: torch.Tensor, state: dict, base: int, *, reduce: str = "max", backend: str | None = None):
    """Merge a batch of activations into running per-channel top-k lists, in place.

    Args:
        x: ``(B, C, S)`` float16/bfloat16/float32/float64 tensor, any strides (a
            ``(B, C, H, W)`` map passes as ``x.flatten(2)``; ``(B, T, C)`` tokens as
            ``x.transpose(1, 2)``).
        state: from :func:`new_state` (C, k), on ``x``'s device.
        base: dataset index of row 0 of this batch; must grow along the stream for the
            tie rule (lower index first) to hold.
        reduce: ``"max"`` (position = first argmax in ``0..S-1``) or ``"mean"`` (position -1).
        backend: force ``"reference" | "cpu" | "cuda" | "triton"``.

    Returns:
        ``state`` (updated in place).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"x must be a (B, C, S) tensor with C, S >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _IN:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if reduce not in MODES:
        raise ValueError(f"reduce must be one of {sorted(MODES)}, got {reduce!r}")
    vals, idx, pos, bad = _check_state(state, x)
    OP.select((x,), backend).fn(x, vals, idx, pos, bad, int(base), MODES[reduce])
    return state


# (key, dtype, shape) of each state tensor; "k" stands for vals' second dimension
_STATE = (("vals", torch.float64, ("C", "k")), ("idx", torch.int64, ("C", "k")),
          ("pos", torch.int64, ("C", "k")), ("bad", torch.int64, ("C",)))


def _check_state(state, x: torch.Tensor):
    """``(vals, idx, pos, bad)`` of ``state`` once each matches :func:`new_state` for ``x``.

    The kernels write through raw pointers with (C, k) row-major indexing: a wrong dtype,
    shape or layout would corrupt memory or scramble the lists, so every tensor is checked."""
    if not isinstance(state, dict) or any(key not in state for key, _, _ in _STATE):
        raise TypeError("state must be the dict of new_state(channels, k) with keys 'vals', 'idx', 'pos', 'bad'")
    vals = state["vals"]
    if not isinstance(vals, torch.Tensor) or vals.dim() != 2 or vals.shape[1] < 1:
        raise ValueError(f"state['vals'] must be a (C, k) tensor with k >= 1, got "
                         f"{tuple(vals.shape) if isinstance(vals, torch.Tensor) else type(vals).__name__}")
    sizes = {"C": x.shape[1], "k": vals.shape[1]}
    for key, dtype, dims in _STATE:
        t = state[key]
        want = tuple(sizes[s] for s in dims)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"state[{key!r}] must be a contiguous {want} {dtype} tensor on {x.device} "
                             f"(x has C={sizes['C']} channels), got {tuple(t.shape)} {t.dtype} on {t.device} "
                             f"(contiguous={t.is_contiguous()}); build the state with "
                             f"new_state(channels, k, device=x.device)")
    return vals, state["idx"], state["pos"], state["bad"]
