"""Base of the streaming statistics: a state of float64 sums that merge by addition.

torchmetrics-style (update / compute / reset), plus ``merge`` (add another
accumulator's sums), ``state_dict`` / ``load_state_dict`` (checkpoints; an
accumulator that has seen nothing saves an empty state), and ``sync(group)``: the
ranks agree on the layout, then one ``torch.distributed.all_reduce(SUM)`` of all
summed states packed into a single float64 buffer (DESIGN.md principle 5); a rank
without data adds zeros. Options the sums depend on (``_options``) are saved with
the state and must match on load, merge and sync.

Sums of raw moments cancel catastrophically when a feature's mean is large against
its spread (a constant layer's variance comes out as -1e17 instead of 0). Subclasses
that need moments therefore accumulate *shifted* sums, of x - s with a per-feature
reference s fixed by the first batch (:func:`reference_shift`); ``merge`` and ``sync``
re-express another state about this state's reference before adding.
"""
from __future__ import annotations

import copy

import torch


def reference_shift(x64: torch.Tensor) -> torch.Tensor:
    """Reference point ``(d,)`` float64 for shifted sums, from a first ``(n, d)`` float64 batch.

    The column means, except that a column constant in this batch gets its exact
    value: a feature constant over the whole stream then sums exact zeros (variance
    exactly 0, not a rounding residue)."""
    lo, hi = torch.aminmax(x64, dim=0)
    return torch.where(lo == hi, lo, x64.mean(0))


def check_options(name: str, mine: dict, saved: dict | None, what: str, why: str = "") -> None:
    """ValueError naming the options of ``saved`` (a state's, or another accumulator's) that
    differ from ``mine``, the options of accumulator class ``name``; ``why`` says what would mix.
    A state of an older version (``saved`` None) records none and is accepted."""
    if saved is None:
        return
    diff = {k: (saved[k], v) for k, v in mine.items() if k in saved and saved[k] != v}
    if diff:
        was = ", ".join(f"{k}={a!r}" for k, (a, _) in diff.items())
        now = ", ".join(f"{k}={b!r}" for k, (_, b) in diff.items())
        raise ValueError(f"{what} {name}({was}) but this is {name}({now}){why}; construct it with {was}")


class Accumulator:
    """Subclasses declare ``_sum_states`` (names of tensor attributes that add up) and
    ``_meta_keys`` (layout attributes that must agree before states can be added) and,
    for shifted sums, ``_shift_states`` (reference points: saved, never added) with
    ``_reshifted(shifts)``, the sums re-expressed about new reference points."""

    _sum_states: tuple[str, ...] = ()
    _meta_keys: tuple[str, ...] = ()
    _shift_states: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    # -- lifecycle -----------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the next ``update`` sets the layout again."""
        for k in self._sum_states:
            setattr(self, k, None)
        for k in (*self._meta_keys, *self._shift_states):
            setattr(self, k, None)

    @property
    def initialized(self) -> bool:
        return all(getattr(self, k) is not None for k in self._sum_states)

    def _require_data(self, what: str) -> None:
        if not self.initialized:
            raise ValueError(f"{type(self).__name__}.{what}() called before any update(): feed at least one batch")

    # -- options -------------------------------------------------------------
    def _options(self) -> dict:
        """Constructor options the sums depend on: saved in ``state_dict`` and checked by
        ``load_state_dict`` and ``merge`` (sums made with other options cannot be mixed)."""
        return {}

    def _check_options(self, saved: dict | None, what: str) -> None:
        check_options(type(self).__name__, self._options(), saved, what)

    # -- combination ---------------------------------------------------------
    def _meta(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self._meta_keys}

    def _check_compatible(self, other: "Accumulator") -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        a, b = self._meta(), other._meta()
        if a != b:
            diff = [k for k in a if a[k] != b[k]]
            raise ValueError(f"cannot merge {type(self).__name__}s with different layouts ({', '.join(diff)} "
                             "differ): they must see the same layers of the same models")

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add ``other``'s sums into this accumulator (batches, shards or checkpoints)."""
        if type(other) is not type(self):
            raise TypeError(f"other must be a {type(self).__name__}, got {type(other).__name__}")
        self._check_options(other._options(), "cannot merge a")
        if not other.initialized:
            return self
        if not self.initialized:
            self.load_state_dict(other.state_dict())
            return self
        self._check_compatible(other)
        if self._shift_states:  # other's sums about this state's reference points (other unchanged)
            sums = other._reshifted([getattr(self, k).to(getattr(other, k).device) for k in self._shift_states])
        else:
            sums = {k: getattr(other, k) for k in self._sum_states}
        for k in self._sum_states:
            mine = getattr(self, k)
            mine.add_(sums[k].to(mine.device))
        return self

    # -- persistence ---------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors (on CPU), layout metadata and options; ``torch.save``-able. Before any
        ``update`` an *empty* state (``{"empty": True, ...}``), which ``load_state_dict``
        accepts: a checkpoint may be written while a statistic has not seen a batch yet."""
        if not self.initialized:
            return {"__class__": type(self).__name__, "empty": True, "options": self._options()}
        out = {k: getattr(self, k).detach().cpu().clone() for k in (*self._sum_states, *self._shift_states)}
        out.update(self._meta())
        out["__class__"] = type(self).__name__
        out["options"] = self._options()
        return out

    def load_state_dict(self, state: dict) -> "Accumulator":
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        cls = state.get("__class__")
        if cls != type(self).__name__:
            raise ValueError(f"state was saved by {cls}, not {type(self).__name__}")
        self._check_options(state.get("options"), "state was saved by")
        if state.get("empty"):
            self.reset()
            return self
        missing = [k for k in (*self._sum_states, *self._meta_keys) if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}; was it produced by state_dict()?")
        device = self._device()
        for k in self._sum_states:
            setattr(self, k, state[k].to(device=device, dtype=torch.float64).clone())
        for k in self._meta_keys:
            setattr(self, k, copy.deepcopy(state[k]))
        for k in self._shift_states:  # absent from states saved before shifted sums: None (raw sums)
            v = state.get(k)
            setattr(self, k, None if v is None else v.to(device=device, dtype=torch.float64).clone())
        return self

    def _reshift(self, shifts: list[torch.Tensor]) -> None:
        """Re-express this state's sums about the reference points ``shifts``."""
        for k, v in self._reshifted(shifts).items():
            setattr(self, k, v)
        for k, v in zip(self._shift_states, shifts):
            setattr(self, k, v.to(self._device()).clone())

    def _reshifted(self, shifts: list[torch.Tensor]) -> dict:  # pragma: no cover - overridden
        """``{sum state: its value about shifts}`` without changing this state: ``merge`` reads
        another accumulator's sums this way instead of copying it whole."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        for k in self._sum_states:
            t = getattr(self, k, None)
            if t is not None:
                return t.device
        return torch.device("cpu")

    # -- distributed ---------------------------------------------------------
    def sync(self, group=None, *, allow_empty: bool = False) -> "Accumulator":
        """Sum the states of all ranks in ``group``; no-op when not distributed.

        The ranks first agree on the layout (one ``all_gather_object``), so that they all
        take the same path: a rank that saw no batch contributes zeros in the layout of the
        first rank with data; when no rank has data every rank raises the same ValueError
        (with ``allow_empty``, every rank stays empty instead). Then one broadcast of the
        reference points and one all_reduce. With NCCL the states must be on the rank's
        CUDA device.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        src = self._agree_layout(dist, group)
        if src is None:
            if allow_empty:
                return self
            raise ValueError(f"{type(self).__name__}.sync(): no rank has data (every rank's accumulator is "
                             "empty); feed at least one batch on some rank")
        if self._shift_states:  # every rank re-expresses its sums about the first rank's reference
            shifts = [getattr(self, k) for k in self._shift_states]
            flat = torch.cat([t.reshape(-1) for t in shifts])
            dist.broadcast(flat, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
            self._reshift(list(flat.split([t.numel() for t in shifts])))
        tensors = [getattr(self, k) for k in self._sum_states]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    def _layout(self) -> dict | None:
        """What ranks must agree on before adding states (None before any update)."""
        if not self.initialized:
            return None
        return {"meta": self._meta(),
                "shapes": {k: tuple(getattr(self, k).shape) for k in (*self._sum_states, *self._shift_states)}}

    def _agree_layout(self, dist, group) -> int | None:
        """Gather every rank's options and layout; the group index of the first rank with data
        (None: no rank has any). An empty rank takes that layout with zero sums. Raises on
        every rank alike when options or layouts differ: an all_reduce of buffers of different
        sizes would hang or mix unrelated sums."""
        got = [None] * dist.get_world_size(group)
        dist.all_gather_object(got, (self._options(), self._layout()), group=group)
        if any(opts != got[0][0] for opts, _ in got):
            raise ValueError(f"cannot sync {type(self).__name__}s constructed with different options "
                             f"({[opts for opts, _ in got]} by rank); every rank must use the same ones")
        full = [r for r, (_, lay) in enumerate(got) if lay is not None]
        if not full:
            return None
        ref = got[full[0]][1]
        other = [r for r in full if got[r][1] != ref]
        if other:
            raise ValueError(f"cannot sync {type(self).__name__}s with different layouts: rank(s) {other} differ "
                             f"from rank {full[0]} ({got[other[0]][1]['meta']} vs {ref['meta']}); every rank must "
                             "see the same layers of the same models")
        if not self.initialized:
            self._adopt(ref, torch.device("cuda", torch.cuda.current_device())
                        if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        return full[0]

    def _adopt(self, layout: dict, device: torch.device) -> None:
        """Become an accumulator of ``layout`` that has seen nothing: zero sums (the reference
        points are replaced by the broadcast; shifting zero sums leaves them zero)."""
        for k, v in layout["meta"].items():
            setattr(self, k, copy.deepcopy(v))
        for k in (*self._sum_states, *self._shift_states):
            setattr(self, k, torch.zeros(layout["shapes"][k], dtype=torch.float64, device=device))

    def clone(self) -> "Accumulator":
        return copy.deepcopy(self)
