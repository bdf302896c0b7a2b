"""Base of the streaming statistics: a state of float64 sums that merge by addition.

torchmetrics-style (update / compute / reset), plus ``merge`` (add another
accumulator's sums), ``state_dict`` / ``load_state_dict`` (checkpoints), and
``sync(group)``: one ``torch.distributed.all_reduce(SUM)`` of all summed states
packed into a single float64 buffer (DESIGN.md principle 5).
"""
from __future__ import annotations

import copy

import torch


class Accumulator:
    """Subclasses declare ``_sum_states`` (names of tensor attributes that add up) and
    ``_meta_keys`` (layout attributes that must agree before states can be added)."""

    _sum_states: tuple[str, ...] = ()
    _meta_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    # -- lifecycle -----------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the next ``update`` sets the layout again."""
        for k in self._sum_states:
            setattr(self, k, None)
        for k in self._meta_keys:
            setattr(self, k, None)

    @property
    def initialized(self) -> bool:
        return all(getattr(self, k) is not None for k in self._sum_states)

    def _require_data(self, what: str) -> None:
        if not self.initialized:
            raise ValueError(f"{type(self).__name__}.{what}() called before any update(): feed at least one batch")

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
        if not other.initialized:
            return self
        if not self.initialized:
            self.load_state_dict(other.state_dict())
            return self
        self._check_compatible(other)
        for k in self._sum_states:
            mine = getattr(self, k)
            mine.add_(getattr(other, k).to(mine.device))
        return self

    # -- persistence ---------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors (on CPU) and layout metadata; ``torch.save``-able."""
        self._require_data("state_dict")
        out = {k: getattr(self, k).detach().cpu().clone() for k in self._sum_states}
        out.update(self._meta())
        out["__class__"] = type(self).__name__
        return out

    def load_state_dict(self, state: dict) -> "Accumulator":
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        cls = state.get("__class__")
        if cls != type(self).__name__:
            raise ValueError(f"state was saved by {cls}, not {type(self).__name__}")
        missing = [k for k in (*self._sum_states, *self._meta_keys) if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}; was it produced by state_dict()?")
        device = self._device()
        for k in self._sum_states:
            setattr(self, k, state[k].to(device=device, dtype=torch.float64).clone())
        for k in self._meta_keys:
            setattr(self, k, copy.deepcopy(state[k]))
        return self

    def _device(self) -> torch.device:
        for k in self._sum_states:
            t = getattr(self, k, None)
            if t is not None:
                return t.device
        return torch.device("cpu")

    # -- distributed ---------------------------------------------------------
    def sync(self, group=None) -> "Accumulator":
        """Sum the states of all ranks in ``group`` (one all_reduce); no-op when not distributed.

        Every rank must have called ``update`` at least once (the layout is set by the
        first batch). With NCCL the states must be on the rank's CUDA device.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        self._require_data("sync")
        tensors = [getattr(self, k) for k in self._sum_states]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    def clone(self) -> "Accumulator":
        return copy.deepcopy(self)
