"""Base of the transforms: a magnitude, a seed, and a per-device torch.Generator.

A transform ``T`` maps a batch to a transformed batch of the same shape, drawing its
random parameters (one draw per sample) from its own generator. Two calls give two
independent draws ``T``, ``T'`` (what the two-view invariance score needs); the whole
sequence of draws is fixed by ``seed`` (METRICS.md §3.8: record the transform seed).
"""
from __future__ import annotations

import math

import torch


def check_magnitude(value, name: str, *, low: float = 0.0, high: float = math.inf,
                    high_inclusive: bool = True) -> float:
    """A finite float in ``[low, high]`` (or ``[low, high)``), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and v >= low and (v <= high if high_inclusive else v < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}={value!r} is out of range; it must lie in [{low}, {high}{bracket}")
    return v


class Transform:
    """A seeded, batched transform ``x -> T(x)`` with a magnitude.

    Subclasses implement ``_apply(x, generator)``; ``__call__`` validates and picks
    the generator. Pass ``generator=`` to draw from your own stream instead.

    ``deterministic``: True when the transform's draw cannot vary (T = T' on every call:
    a blur, magnitude 0, a flip with probability 1); such transforms are scored one-view,
    all others two-view (see :func:`scored_two_view`). It is read per instance, since
    whether the draw can vary depends on the magnitude; subclasses say so in
    ``_draw_is_fixed``, and magnitudes at which the transform is the identity in
    ``_is_identity`` (then ``__call__`` returns an exact copy of ``x``).
    """

    magnitude: float = 0.0

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    @property
    def deterministic(self) -> bool:
        """True when T = T' on every call (scored one-view, NIS_1). Assignable: a subclass
        (or user) may declare it per instance, which then overrides ``_draw_is_fixed``."""
        declared = self.__dict__.get("_deterministic")
        return bool(self._draw_is_fixed()) if declared is None else declared

    @deterministic.setter
    def deterministic(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"deterministic must be True or False, got {value!r}")
        self._deterministic = value

    def _draw_is_fixed(self) -> bool:
        """Whether the draw cannot vary; by default only when the transform is the identity."""
        return self._is_identity()

    def _is_identity(self) -> bool:
        """Whether this magnitude leaves every input unchanged (exactly)."""
        return False

    def reset(self) -> "Transform":
        """Restart the random stream: the next calls repeat the first draws."""
        self._generators.clear()
        return self

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(torch.device(device))
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[key] = g
        return g

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self._check_input(x)
        if self._is_identity():
            # exact, in every dtype: resampling at zero shift or angle is off by rounding
            return x.clone()
        g = generator if generator is not None else self.generator(x.device)
        return self._apply(x, g)

    def _check_input(self, x: torch.Tensor) -> None:  # pragma: no cover - overridden
        pass

    def _apply(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(magnitude={self.magnitude!r}, seed={self.seed})"


def uniform(n, low: float, high: float, g: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """``n`` (an int or a shape) draws from U[low, high) on ``device`` from ``g``."""
    return torch.rand(n, generator=g, device=device, dtype=dtype) * (high - low) + low


class Lambda(Transform):
    """Any user callable ``fn(x) -> Tx`` (or ``fn(x, generator) -> Tx`` when
    ``takes_generator=True``, so that its randomness follows the seed too).

    ``deterministic=True`` declares that ``fn`` draws nothing (scored one-view); by
    default a callable is taken to be random (scored two-view)."""

    deterministic: bool = False  # the user's declaration, a plain attribute (shadows the property)

    def __init__(self, fn, *, magnitude: float = float("nan"), takes_generator: bool = False,
                 deterministic: bool = False, seed: int = 0) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable x -> Tx, got {type(fn).__name__}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
        super().__init__(seed=seed)
        self.fn, self.magnitude, self.takes_generator = fn, magnitude, takes_generator
        self.deterministic = deterministic

    def _apply(self, x, g):
        out = self.fn(x, g) if self.takes_generator else self.fn(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the transform callable returned {type(out).__name__}, expected a torch.Tensor")
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"the transform callable changed the batch size from {x.shape[0]} to "
                             f"{out.shape[0]}; it must map each sample to one transformed sample")
        return out

    def __repr__(self) -> str:
        return f"Lambda({getattr(self.fn, '__name__', self.fn)!r}, seed={self.seed})"


def scored_two_view(t: Transform) -> bool:
    """The one rule for which invariance score a transform gets (METRICS.md §3.5), decided
    once per transform instance (``t.deterministic``, which may depend on its magnitude)
    and never from the data: a deterministic transform (T = T', so
    the two-view NIS_2 would be 1 by construction) is scored one-view, NIS_1 against
    f(x); a random one two-view, NIS_2 between two independent draws."""
    return not bool(getattr(t, "deterministic", False))


def as_transform(t, *, seed: int = 0) -> Transform:
    """A :class:`Transform` as is; a plain callable wrapped in :class:`Lambda`."""
    if isinstance(t, Transform):
        return t
    if callable(t):
        return Lambda(t, seed=seed)
    raise TypeError(f"expected a hierfast Transform or a callable x -> Tx, got {type(t).__name__}")
