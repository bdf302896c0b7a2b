"""hierfast: fast, correct statistics of the hierarchy of representations in deep networks.

>>> import hierfast
>>> sorted(hierfast.info()["backends"])
['cpu', 'cuda', 'reference', 'triton']
"""
__version__ = "0.1.0"

from ._info import format_info, info  # noqa: E402
from . import backends, ops, stats  # noqa: E402
from . import capture  # noqa: E402
from .capture import analyze  # noqa: E402

__all__ = ["__version__", "info", "format_info", "backends", "ops", "stats", "capture", "analyze", "nn",
           "functional"]


def __getattr__(name):  # lazy: hierfast.nn / hierfast.functional import on first use
    if name in ("nn", "functional", "visualize"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hierfast' has no attribute {name!r}")
