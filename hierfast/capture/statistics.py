"""The statistic-plugin protocol of :func:`hierfast.analyze`, its registry, and ``"cka"``.

A statistic is registered under a name with a *factory*::

    register_statistic(name, factory)
    factory(layers_a: list[str], layers_b: list[str] | None, **options) -> Statistic

``analyze`` calls the factory after the first forward, when the recorded layer names (in
run order) are known; ``layers_b`` is None unless ``compare_to`` was given. The object
it returns implements :class:`Statistic`:

- ``update_batch(feats_a, feats_b, batch)``: called once per batch with
  ``feats_a: dict[str, Tensor]`` (layer name -> ``(M, d)`` features of the model),
  ``feats_b: dict[str, Tensor] | None`` (the same for ``compare_to``; None otherwise) and a
  :class:`BatchContext`. ``batch.forward(inputs)`` runs the model(s) on other inputs
  (e.g. transformed ones) through the same capture and returns ``(feats_a, feats_b)``.
- ``compute()``: the value stored as ``Results.<name>`` (a tensor, a dict of tensors, or
  numbers; tensors and dicts of tensors are saved to ``.npz`` by ``Results.save``).
- ``state_dict()`` / ``load_state_dict(state)``: ``torch.save``-able state (tensors, numbers,
  strings, lists, dicts) for checkpoints; resuming must reproduce the uninterrupted result,
  so keep sums in float64 and add them in batch order. Also called before the statistic has
  seen any batch (every batch so far too small for it): return, and accept, an empty state
  then (:class:`hierfast.stats.Accumulator` does).
- ``sync(group=None)``: sum the state over the ranks of ``torch.distributed`` (one
  ``all_reduce``; :meth:`hierfast.stats.Accumulator.sync` does it); no-op when not
  distributed. Every rank calls it, also one whose batches were all too small for this
  statistic: such a rank must take part in the same collectives and add nothing (zeros).
  ``analyze`` raises on every rank instead when no rank has data for a statistic.

``register_statistic(..., min_samples=k)``: the statistic needs at least ``k`` feature rows
per batch (``"cka"``: 4, for the unbiased HSIC); ``k`` may also be a function of the
statistic's options, ``f(options) -> int``. ``analyze`` leaves a smaller batch (a ragged
last batch) out of that statistic only, warns, and counts it in ``Results.skipped_small``.

Everything runs under ``torch.inference_mode()``; features live on the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Union, runtime_checkable

import torch

from ..stats import MinibatchCKA


@dataclass
class BatchContext:
    """What a statistic may know about the current batch besides its features.

    Attributes:
        index: 0-based position of the batch in ``data``.
        inputs: the model inputs, on the device (tensor, tuple or dict, as in ``data``).
        labels: ``y`` of an ``(x, y)`` batch (or a dict's ``labels``), on the device; else None.
        attention_mask: ``(N, T)`` mask of a dict batch, else None.
        batch_size: N, the number of samples of the batch.
        forward: ``forward(inputs) -> (feats_a, feats_b)``: run the model(s) on other inputs
            (same format as ``inputs``) through the same capture and reductions.
    """

    index: int
    inputs: Any
    labels: torch.Tensor | None
    attention_mask: torch.Tensor | None
    batch_size: int
    forward: Callable[[Any], tuple[dict, dict | None]]


@runtime_checkable
class Statistic(Protocol):
    def update_batch(self, feats_a: dict, feats_b: dict | None, batch: BatchContext) -> None: ...
    def compute(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...
    def sync(self, group=None) -> Any: ...


_REGISTRY: dict[str, Callable[..., Statistic]] = {}
MinSamples = Union[int, Callable[[Mapping], int]]
_MIN_SAMPLES: dict[str, MinSamples] = {}


def register_statistic(name: str, factory: Callable[..., Statistic], *, overwrite: bool = False,
                       min_samples: MinSamples = 1) -> None:
    """Make ``name`` usable in ``analyze(stats=(name, ...))``; see the module docstring.
    ``min_samples``: the fewest feature rows a batch must have for this statistic (an int,
    or ``f(options) -> int``)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"statistic name must be a Python identifier (it becomes Results.<name>), got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (layers_a, layers_b, **options) -> Statistic, got "
                        f"{type(factory).__name__}")
    if not callable(min_samples):
        _check_min(min_samples, name)
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"a statistic named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory
    _MIN_SAMPLES[name] = min_samples


def _check_min(k, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"min_samples of statistic {name!r} must be a positive int, got {k!r}")
    return k


def min_samples(name: str, options: Mapping | None = None) -> int:
    """The fewest feature rows per batch statistic ``name`` needs with these options."""
    get_statistic(name)
    k = _MIN_SAMPLES[name]
    return _check_min(k(dict(options or {})) if callable(k) else k, name)


def available_statistics() -> list[str]:
    return sorted(_REGISTRY)


def get_statistic(name: str) -> Callable[..., Statistic]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown statistic {name!r}; registered: {available_statistics()} (add one with "
                         "hierfast.capture.register_statistic)")
    return _REGISTRY[name]


class CKAStatistic:
    """Debiased minibatch linear CKA (:class:`hierfast.stats.MinibatchCKA`, Nguyen et al. 2021)
    of every layer pair: ``compute()`` is the ``(La, Lb)`` float64 matrix (``(L, L)`` for one
    model, from one forward per batch). Options: ``backend`` (see ``hierfast.backends``)."""

    def __init__(self, layers_a, layers_b=None, *, backend: str | None = None) -> None:
        self.acc = MinibatchCKA(backend=backend)

    def update_batch(self, feats_a, feats_b, batch) -> None:
        self.acc.update(feats_a, feats_b)

    def compute(self) -> torch.Tensor:
        return self.acc.compute().detach().clone()  # a plain tensor, without the name attributes

    def state_dict(self) -> dict:
        return self.acc.state_dict()

    def load_state_dict(self, state: dict) -> "CKAStatistic":
        self.acc.load_state_dict(state)
        return self

    def sync(self, group=None) -> "CKAStatistic":
        self.acc.sync(group)
        return self


register_statistic("cka", CKAStatistic, min_samples=4)  # the unbiased HSIC divides by n - 3
