"""Backend registry: which implementation of an op runs, and why.

Four backends exist (DESIGN.md principle 3):

* ``reference`` plain torch, float64-capable: the definition of "correct";
* ``cpu``       C++/OpenMP kernels in ``hierfast._C``;
* ``cuda``      CUDA C++ kernels in ``hierfast._C_cuda``;
* ``triton``    Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Each op keeps an ordered list of :class:`Impl` (one per backend) that declare the
devices and dtypes they take and a ``reasons(*tensors)`` hook for data-dependent
limits. :meth:`Op.select` returns the first implementation with no reasons against
it. ``backend=`` (per call) or ``HIERFAST_BACKEND`` (read at call time, never at
import) forces one; a forced backend that cannot run raises listing the reasons; an
automatic choice that passes over an *available-in-principle* faster backend warns
once with :class:`BackendFallbackWarning`.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendFallbackWarning(RuntimeWarning):
    """An op ran on a slower backend than the one that should serve it."""


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


# -- availability of each backend (process-wide) --------------------------------

def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str) -> dict:
    """``{"available": bool, "reason": str | None, ...}`` for one backend."""
    if name == "reference":
        return {"available": True, "reason": None, "note": "plain torch"}
    if name == "cpu":
        mod, reason = _ext.cpu_module()
        if mod is None:
            return {"available": False, "reason": reason}
        return {"available": True, "reason": None, "openmp_threads": mod.openmp_max_threads()}
    if name == "cuda":
        mod, reason = _ext.cuda_module()
        if mod is None:
            return {"available": False, "reason": "hierfast was built without CUDA (nvcc not found at build "
                    "time or HIERFAST_CUDA=0); " + reason, "compiled": False}
        if not torch.cuda.is_available():
            return {"available": False, "compiled": True,
                    "reason": "compiled, but torch sees no CUDA device on this machine"}
        return {"available": True, "reason": None, "compiled": True,
                "devices": torch.cuda.device_count()}
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return {"available": False, "reason": "triton is not installed (`pip install triton`)"}
        if torch.cuda.is_available():
            return {"available": True, "reason": None, "mode": "gpu"}
        if _triton_interpret():
            return {"available": True, "reason": None, "mode": "interpreter (TRITON_INTERPRET=1, CPU tensors)"}
        return {"available": False, "reason": "no CUDA device (set TRITON_INTERPRET=1 to run Triton "
                "kernels on the CPU interpreter, slowly)"}
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def forced_backend(backend: str | None) -> str | None:
    """The backend forced by the argument, else by ``HIERFAST_BACKEND``, else None."""
    if backend is None:
        backend = os.environ.get("HIERFAST_BACKEND") or None
        source = "HIERFAST_BACKEND"
    else:
        source = "backend"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return backend


# -- per-op registry -------------------------------------------------------------

@dataclass
class Impl:
    """One backend's implementation of an op."""

    backend: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    reasons: Callable[..., list[str]] | None = None

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor]) -> list[str]:
        status = backend_status(self.backend)
        out = [] if status["available"] else [status["reason"]]
        for t in tensors:
            if t.device.type not in self.devices:
                out.append(f"takes tensors on {'/'.join(self.devices)}, got {t.device.type}")
                break
            if self.backend == "triton" and t.device.type == "cpu" and not _triton_interpret():
                out.append("CPU tensors need TRITON_INTERPRET=1")
                break
        for t in tensors:
            if t.dtype not in self.dtypes:
                out.append(f"does not take {t.dtype} (takes {', '.join(str(d) for d in self.dtypes)})")
                break
        if self.reasons is not None and not out:
            out += self.reasons(*tensors)
        return out


@dataclass
class Op:
    """An op with its implementations, in order of preference per device."""

    name: str
    preference: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
    impls: dict[str, Impl] = field(default_factory=dict)
    _warned: set = field(default_factory=set)
    # (forced backend, TRITON_INTERPRET, (device, dtype) per tensor) -> Impl, kept
    # when no implementation the selection consulted has data-dependent limits
    # (`reasons`): selection costs ~20-40 us otherwise, which adds up when streaming
    # accumulators call small kernels per layer per batch, and on every fused conv call.
    _cache: dict = field(default_factory=dict)

    def register(self, backend: str, *, devices, dtypes, reasons=None):
        """Decorator registering ``fn`` as this op's ``backend`` implementation."""
        def deco(fn):
            self.impls[backend] = Impl(backend, fn, tuple(devices), tuple(dtypes), reasons)
            self._cache.clear()
            return fn
        return deco

    def select(self, tensors: Sequence[torch.Tensor], backend: str | None = None) -> Impl:
        forced = forced_backend(backend)
        # torch.device objects, not .device.type strings: 0.4 against 1.1 us for three tensors
        key = (forced, _triton_interpret(), tuple([(t.device, t.dtype) for t in tensors]))
        impl = self._cache.get(key)
        if impl is not None:
            return impl
        impl = self._select(tensors, forced)
        if self._depends_on_types_only(impl, forced, tensors):
            self._cache[key] = impl
        return impl

    def _depends_on_types_only(self, chosen: Impl, forced: str | None, tensors) -> bool:
        """The choice of ``chosen`` depended only on what the cache key holds: every
        implementation consulted before it (and it) has no data-dependent ``reasons``."""
        if forced is not None:
            consulted = (forced,)
        else:
            order = self._order(tensors)
            consulted = order[:order.index(chosen.backend) + 1]
        return all(self.impls[n].reasons is None for n in consulted if n in self.impls)

    def _order(self, tensors: Sequence[torch.Tensor]) -> tuple[str, ...]:
        """The backends to try, in order, for tensors on this device."""
        return self.preference.get(tensors[0].device.type if tensors else "cpu", ("reference",))

    def _select(self, tensors: Sequence[torch.Tensor], forced: str | None) -> Impl:
        if forced is not None:
            impl = self.impls.get(forced)
            if impl is None:
                raise BackendUnavailableError(f"{self.name}: no {forced!r} implementation exists "
                                              f"(have: {', '.join(self.impls)})")
            why = impl.not_supported_reasons(tensors)
            if why:
                raise BackendUnavailableError(f"{self.name}: backend {forced!r} was forced but cannot run: "
                                              + "; ".join(why))
            return impl
        device = tensors[0].device.type if tensors else "cpu"
        order = self._order(tensors)
        skipped = []
        for name in order:
            impl = self.impls.get(name)
            if impl is None:
                continue
            why = impl.not_supported_reasons(tensors)
            if not why:
                if skipped:
                    self._warn_fallback(device, name, skipped)
                return impl
            skipped.append((name, why))
        raise BackendUnavailableError(f"{self.name}: no backend can run this call: "
                                      + " | ".join(f"{n}: {'; '.join(w)}" for n, w in skipped))

    def _warn_fallback(self, device, chosen, skipped):
        # Warn only when a backend was passed over because it is *missing* (not
        # built, no driver), not for a data limit such as an unsupported dtype.
        missing = [(n, w) for n, w in skipped if not backend_status(n)["available"]]
        key = (device, chosen, tuple(n for n, _ in missing))
        if missing and key not in self._warned:
            self._warned.add(key)
            detail = "; ".join(f"{n}: {w[0]}" for n, w in missing)
            warnings.warn(f"hierfast {self.name}: running on the {chosen!r} backend because {detail}",
                          BackendFallbackWarning, stacklevel=4)

    def __call__(self, *tensors, backend: str | None = None, **kwargs):
        impl = self.select(tensors, backend)
        return impl.fn(*tensors, **kwargs)
