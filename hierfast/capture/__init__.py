"""hierfast.capture: record per-layer outputs of any model and stream statistics over a dataset.

:class:`LayerCapture` records what selected layers return (in-place safe, any output
structure, repeated calls suffixed ``#k``); :func:`analyze` streams ``data`` through one or
two models and feeds registered statistics (:mod:`hierfast.capture.statistics`), returning
:class:`Results`.
"""
from .engine import analyze
from .layer_capture import LayerCapture
from .results import Results
from .statistics import BatchContext, Statistic, available_statistics, get_statistic, register_statistic
from . import builtin_stats  # noqa: F401  (registers "sparsity", ...)

__all__ = ["LayerCapture", "analyze", "Results", "BatchContext", "Statistic", "register_statistic",
           "get_statistic", "available_statistics"]
