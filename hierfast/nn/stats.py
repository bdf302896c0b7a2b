"""Statistics taps over the ``Conv2dAct`` layers of a model."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .conv_act import Conv2dAct


def track_stats(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch statistics accumulation on (or off) in every ``Conv2dAct`` of ``model``
    (use :func:`hierfast.nn.fuse` first to turn Conv2d + activation into them).
    Returns the names of the layers switched."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, Conv2dAct):
            m.track_stats = enabled
            names.append(name)
    return names


def layer_stats(model: nn.Module) -> dict:
    """``{layer name: Conv2dAct.stats()}`` for every tracked layer that has seen data."""
    return {name: m.stats() for name, m in model.named_modules()
            if isinstance(m, Conv2dAct) and m.stats() is not None}


def reset_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Conv2dAct):
            m.reset_stats()


@contextlib.contextmanager
def paused_stats(model: nn.Module) -> Iterator[None]:
    """Within the block no ``Conv2dAct`` of ``model`` accumulates statistics (for forwards of
    synthetic or probe inputs that must not count as data); on exit, also on an exception,
    each layer's ``track_stats`` is what it was. Statistics already accumulated are kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"paused_stats(model): model must be a torch.nn.Module, got {type(model).__name__}")
    saved = [(m, m.track_stats) for m in model.modules() if isinstance(m, Conv2dAct)]
    for m, _ in saved:
        m.track_stats = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.track_stats = flag
