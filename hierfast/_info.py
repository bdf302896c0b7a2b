"""hierfast.info(): versions and which backends can run here, and why not."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from .backends import BACKENDS, backend_status


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions and backend availability.

    Returns:
        ``{"hierfast", "python", "torch", "triton", "cuda", "platform", "backends"}``
        where ``backends[name] = {"available": bool, "reason": str | None, ...}`` for
        each of ``reference``, ``cpu``, ``triton``, ``cuda``.
    """
    from . import __version__

    return {
        "hierfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": f"{platform.system()} {platform.machine()}",
        "torch_threads": torch.get_num_threads(),
        "backends": {name: backend_status(name) for name in BACKENDS},
    }


def format_info(d: dict | None = None) -> str:
    """The info dict as a plain-text table."""
    d = d or info()
    lines = [f"{k:<12} {d[k]}" for k in ("hierfast", "python", "torch", "triton", "cuda", "cuda_device",
                                          "platform", "torch_threads")]
    lines += ["", f"{'backend':<10} {'available':<10} detail", "-" * 72]
    for name, st in d["backends"].items():
        extra = {k: v for k, v in st.items() if k not in ("available", "reason")}
        detail = st["reason"] or ", ".join(f"{k}={v}" for k, v in extra.items())
        lines.append(f"{name:<10} {'yes' if st['available'] else 'no':<10} {detail}")
    return "\n".join(lines)
