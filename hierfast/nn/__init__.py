"""hierfast.nn: fused layers that mirror torch.nn.

* :class:`Conv2dAct` — ``nn.Conv2d`` + activation in one kernel (same state_dict keys).
* :func:`fuse` — replace Conv2d [+ BatchNorm2d] + activation patterns in a model.
* :func:`track_stats` / :func:`layer_stats` — per-channel statistics taps.
* :func:`frozen_weights` — opt-in CPU inference block that keeps oneDNN's blocked weights
  between calls (the caller promises no writes through ``.data`` or numpy inside it).
"""
from ..functional import frozen_weights
from .conv_act import Conv2dAct
from .fuse import fuse
from .stats import layer_stats, paused_stats, reset_stats, track_stats

__all__ = ["Conv2dAct", "fuse", "track_stats", "layer_stats", "reset_stats", "paused_stats", "frozen_weights"]
