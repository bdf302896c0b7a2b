"""Top-activating dataset examples per layer and channel, in one streaming pass.

Each selected layer's output is reduced per channel (spatial/temporal ``max`` with its
position, or ``mean``) and merged into running top-k lists by the fused kernel
:func:`hierfast.ops.channel_topk`; memory is O(layers x channels x k) whatever the
dataset size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture._data import _first_tensor, call_model, parse_batch, to_device
from ..capture._outputs import pick_output
from ..capture._select import select_layers
from ..ops.channel_topk import channel_topk, new_state
from . import _receptive


@dataclass
class TopActivating:
    """Top-k examples of one layer. ``C`` channels, ``k`` slots sorted by value descending
    (ties: lower dataset index first); empty slots (fewer than ``k`` samples) hold -1 / -inf.

    Attributes:
        layer: module name.
        kind: ``"conv"`` (``(N, C, H, W)`` output), ``"sequence"`` (``(N, T, C)``, or
            ``(N, C, L)`` of a Conv1d), or ``"vector"`` (``(N, C)``).
        indices: ``(C, k)`` int64 dataset indices (position in the stream of samples).
        values: ``(C, k)`` float64 activation (max or mean over positions).
        positions: ``(C, k, 2)`` (row, col) of the max for ``"conv"``, ``(C, k)`` token
            position for ``"sequence"``; -1 with ``reduce="mean"``; None for ``"vector"``.
        boxes: ``"conv"`` + ``reduce="max"`` only: ``(C, k, 4)`` receptive-field crop
            ``(top, left, bottom, right)`` in input pixels (bottom/right exclusive), clipped
            to that example's own image (batches may differ in image size).
        receptive_field: the :class:`~hierfast.visualize._receptive.ReceptiveField` used
            (its ``method`` says ``"analytic"`` or ``"gradient"``).
        context: ``"sequence"`` with integer token-id inputs: ``(C, k, 2w+1)`` ids around the
            top token (centre = the token), -1 outside the sequence.
    """

    layer: str
    kind: str
    indices: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    receptive_field: _receptive.ReceptiveField | None = None
    context: torch.Tensor | None = None


def _as_bcs(name: str, module: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Layer output -> ``(B, C, S)`` view for the kernel, plus its kind."""
    if t.dim() == 4:
        return t.flatten(2), "conv"
    if t.dim() == 3:
        if isinstance(module, nn.modules.conv._ConvNd):  # Conv1d: (N, C, L), channels first
            return t, "sequence"
        return t.transpose(1, 2), "sequence"  # (N, T, C) tokens
    if t.dim() == 2:
        return t.unsqueeze(2), "vector"
    raise ValueError(f"layer {name!r} returned shape {tuple(t.shape)}; top_activating handles (N, C), (N, T, C) "
                     "and (N, C, H, W) outputs")


class _Layer:
    """Running state of one layer.

    Besides the kernel's state, per-slot records ``meta`` (``(C, k, m)`` int64, -1 = none)
    describe where each entry came from: for conv layers ``(row, col, input height, input
    width)`` decoded with the entry's own batch (batches may differ in size), for sequences
    the token context. A merge re-sorts the slots, so the records are moved with their
    entries (:meth:`_follow`) before this batch's new entries are written."""

    def __init__(self, name: str, module: nn.Module, k: int, reduce: str, context: int):
        self.name, self.module, self.k, self.reduce, self.w = name, module, k, reduce, context
        self.state = None
        self.kind = None
        self.meta: dict[str, torch.Tensor] = {}

    def update(self, t: torch.Tensor, base: int, batch: int, ids: torch.Tensor | None,
               in_size: tuple[int, int] | None) -> None:
        x, kind = _as_bcs(self.name, self.module, t)
        if self.state is None:
            self.kind = kind
            self.state = new_state(x.shape[1], self.k, device=x.device)
        elif x.shape[1] != self.state["vals"].shape[0]:
            raise ValueError(f"layer {self.name!r} has {x.shape[1]} channels in batch {batch}, "
                             f"{self.state['vals'].shape[0]} before")
        old_idx = self.state["idx"].clone()
        channel_topk(x.detach(), self.state, base, reduce=self.reduce)
        bad = self.state["bad"]
        if bool((bad > 0).any()):
            ch = torch.nonzero(bad).flatten()[:5].tolist()
            raise ValueError(f"layer {self.name!r} produced NaN activations in data batch {batch} (channels {ch}); "
                             "check the inputs and the model's numerics")
        if self.reduce != "max" or kind == "vector":
            return  # no positions to describe
        new = self._follow(old_idx, base, x.shape[0])
        if kind == "conv":
            self._record_where(new, t.shape[3], in_size)
        elif kind == "sequence" and ids is not None and self.w >= 0:
            self._record_context(new, ids, base)

    def _follow(self, old_idx: torch.Tensor, base: int, n: int) -> torch.Tensor:
        """Move the records with their entries through the merge; returns the mask of the
        slots filled from this batch (dataset indices ``base .. base + n - 1``)."""
        idx = self.state["idx"]
        new = (idx >= base) & (idx < base + n)
        # The merge is a stable sort by the same key as the old list's order, so the old
        # entries that survive are the old list's first ones, in order.
        kept = ~new & (idx >= 0)
        src = ((~new).long().cumsum(1) - 1).clamp_min(0)
        if not torch.equal(old_idx.gather(1, src)[kept], idx[kept]):
            raise RuntimeError("top_activating: the top-k merge reordered surviving entries; records would "
                               "be misattributed (please report this bug)")
        for key, m in self.meta.items():
            m = m.gather(1, src.unsqueeze(2).expand_as(m))
            m[~kept] = -1
            self.meta[key] = m
        return new

    def _slots(self, key: str, width: int) -> torch.Tensor:
        if key not in self.meta:
            C = self.state["idx"].shape[0]
            self.meta[key] = torch.full((C, self.k, width), -1, dtype=torch.int64, device=self.state["idx"].device)
        return self.meta[key]

    def _record_where(self, new: torch.Tensor, out_w: int, in_size: tuple[int, int] | None) -> None:
        """(row, col) from the flat position with *this* batch's output width, plus the size
        of this batch's input image (for clipping its receptive-field box)."""
        where = self._slots("where", 4)
        pos = self.state["pos"][new]
        h, w = in_size if in_size is not None else (-1, -1)
        where[new] = torch.stack([pos // out_w, pos % out_w, torch.full_like(pos, h), torch.full_like(pos, w)], 1)

    def _record_context(self, new: torch.Tensor, ids: torch.Tensor, base: int) -> None:
        # Only entries that entered the top-k from *this* batch need context, and entries
        # never come back once evicted: filling them now keeps memory bounded.
        ctx, w = self._slots("ctx", 2 * self.w + 1), self.w
        if not bool(new.any()):
            return
        idx, pos = self.state["idx"][new].to(ids.device), self.state["pos"][new].to(ids.device)
        padded = torch.nn.functional.pad(ids.long(), (w, w), value=-1)  # (B, T + 2w)
        cols = pos.unsqueeze(1) + torch.arange(2 * w + 1, device=ids.device)  # window in padded coords
        ctx[new] = padded[(idx - base).unsqueeze(1), cols].to(ctx.device)

    def result(self, rf) -> TopActivating:
        st = self.state
        out = TopActivating(self.name, self.kind, st["idx"].cpu(), st["vals"].cpu())
        pos = st["pos"].cpu()
        if self.kind == "conv":
            where = self.meta["where"].cpu() if "where" in self.meta else torch.full((*pos.shape, 4), -1)
            row, col, in_h, in_w = where.unbind(-1)
            out.positions = torch.stack([row, col], -1)
            if rf is not None and self.reduce == "max":
                out.receptive_field = rf
                out.boxes = rf.boxes(row, col, in_h, in_w)
        elif self.kind == "sequence":
            out.positions = pos
            out.context = self.meta["ctx"].cpu() if "ctx" in self.meta else None
        return out


def top_activating(model: nn.Module, data, layers, *, k: int = 9, reduce: str = "max", context: int = 5,
                   progress: bool = False) -> dict[str, TopActivating]:
    """The ``k`` dataset examples that excite each channel of each layer most.

    Args:
        model: any ``nn.Module``; run in eval mode under ``torch.inference_mode`` (its
            training flag is restored afterwards). Its statistics taps
            (``hierfast.nn.track_stats``) count ``data``, which is real input, but not the
            random images of the receptive-field probe.
        data: iterable of batches: tensors, ``(x, y)`` tuples, dicts, or a DataLoader.
            Dataset index = position of the sample in the stream (batch order).
        layers: names, glob patterns, module types or predicates (see ``LayerCapture``).
        k: examples per channel.
        reduce: ``"max"`` over positions (records where) or ``"mean"``.
        context: for sequence layers fed integer token ids ``(N, T)``: keep ``±context``
            ids around the top token (``-1`` to skip).
        progress: show a tqdm bar.

    Returns:
        ``{layer name: TopActivating}`` in ``named_modules`` order. Receptive-field boxes
        (conv layers, ``reduce="max"``, image inputs) come from walking Conv/Pool kernel,
        stride, padding and dilation when the model is a (nested) ``nn.Sequential`` chain of
        conv/pool/elementwise layers up to the layer (exact), else from the input-gradient
        support of one unit (``receptive_field.method == "gradient"``; approximate where
        max-pooling or dead ReLUs shrink the support).

    Raises:
        ValueError: bad ``k``/``reduce``, unknown layer (closest names listed), empty data,
            NaN activations (naming the layer and batch), or a selected layer that never ran.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if not isinstance(context, int) or context < -1:
        raise ValueError(f"context must be an int >= -1 (-1: no context), got {context!r}")
    chosen = select_layers(model, layers)
    states = {n: _Layer(n, m, k, reduce, context) for n, m in chosen}
    ran: set[str] = set()
    ctx = {}
    handles = []
    for n, m in chosen:
        # Merge inside the hook: a later in-place op (ReLU(inplace=True)) may overwrite the
        # output before the forward returns. A module called twice in one forward (shared)
        # contributes its first call only, so each sample is counted once per channel.
        def hook(mod, args, out, n=n):
            if n not in ran:
                ran.add(n)
                states[n].update(pick_output(mod, out, n), ctx["base"], ctx["batch"], ctx["ids"], ctx["size"])
        handles.append(m.register_forward_hook(hook))
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    it = data
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(data, desc="top_activating", unit="batch")
    was_training = model.training
    base, first_x = 0, None
    model.eval()
    try:
        with torch.inference_mode():
            for b, batch in enumerate(it):
                pb = parse_batch(batch, b)
                inputs = to_device(pb.inputs, dev)
                x0 = _first_tensor(inputs)
                if first_x is None:
                    first_x = x0[:1].clone()
                ids = x0 if (x0.dim() == 2 and not x0.is_floating_point() and not x0.is_complex()) else None
                size = tuple(x0.shape[2:]) if x0.dim() == 4 and x0.is_floating_point() else None
                ran.clear()
                ctx.update(base=base, batch=b, ids=ids, size=size)
                call_model(model, inputs)
                base += pb.size
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if base == 0:
        raise ValueError("data yielded no samples")
    missing = [n for n, st in states.items() if st.state is None]
    if missing:
        raise ValueError(f"layers {missing} never ran in the model's forward; select layers that do")
    out = {}
    for n, st in states.items():
        rf = None
        if st.kind == "conv" and reduce == "max" and first_x is not None and first_x.dim() == 4 \
                and first_x.is_floating_point():
            rf = _receptive_field(model, n, st.module, first_x)
        out[n] = st.result(rf)
    return out


def _receptive_field(model, name, module, x):
    from ..nn.stats import paused_stats

    rf = _receptive.analytic(model, name)
    if rf is not None:
        return rf
    was_training = model.training
    model.eval()
    try:
        with paused_stats(model):  # the probe's random images are not data: the taps must not count them
            return _receptive.gradient_probe(model, module, x)
    finally:
        model.train(was_training)
