"""Statistics taps over the ``Conv2dAct`` layers of a model."""
from __future__ import annotations

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
