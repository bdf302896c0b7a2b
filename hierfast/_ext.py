"""Loading of the compiled modules, with the reason recorded when one is missing.

Import failures are never swallowed silently: ``hierfast.info()`` reports them and
a forced backend raises with them (STYLE.md, "Dispatch").
"""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load(name: str):
    """Return ``(module, None)`` or ``(None, reason)`` for ``hierfast.<name>``."""
    try:
        return importlib.import_module(f"hierfast.{name}"), None
    except ImportError as exc:  # not built, or built for another Python
        return None, (
            f"hierfast.{name} is not importable ({exc}); build it with `pip install .` "
            "(or `pip install -e .` in a source tree)"
        )


def cpu_module():
    return load("_C")


def cuda_module():
    return load("_C_cuda")
