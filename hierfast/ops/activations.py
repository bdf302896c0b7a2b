"""The activations of the fused conv layers: names, codes shared with the kernels,
keyword arguments, and plain-torch definitions (forward and derivative).

Codes must match ``csrc/include/hierfast/act.h``. ``grad_from_output``: the derivative
is a function of the output ``y`` (ReLU family, sigmoid, tanh), so backward keeps
only ``y`` — which the next layer holds anyway, so it costs no memory (a 1-bit mask
would be an *extra* N*C*H*W/8 bytes). The smooth ones (GELU, SiLU, Hardswish, Mish)
keep the pre-activation ``z``: recomputing it would mean re-running the convolution.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IDENTITY, RELU, RELU6, LEAKY_RELU, GELU, GELU_TANH, SILU, HARDSWISH, SIGMOID, TANH, MISH = range(11)

# name -> (code, {kwarg: default})
_TABLE = {
    "identity": (IDENTITY, {}),
    "relu": (RELU, {}),
    "relu6": (RELU6, {}),
    "leaky_relu": (LEAKY_RELU, {"negative_slope": 0.01}),
    "gelu": (GELU, {"approximate": "none"}),
    "silu": (SILU, {}),
    "hardswish": (HARDSWISH, {}),
    "sigmoid": (SIGMOID, {}),
    "tanh": (TANH, {}),
    "mish": (MISH, {}),
}
NAMES = tuple(_TABLE)
CODE_NAMES = {IDENTITY: "identity", RELU: "relu", RELU6: "relu6", LEAKY_RELU: "leaky_relu", GELU: "gelu",
              GELU_TANH: "gelu(approximate='tanh')", SILU: "silu", HARDSWISH: "hardswish", SIGMOID: "sigmoid",
              TANH: "tanh", MISH: "mish"}


@dataclass(frozen=True)
class Activation:
    """A resolved activation: kernel ``code`` and its scalar parameter ``alpha``
    (LeakyReLU's negative slope; 0 otherwise)."""

    name: str
    code: int
    alpha: float = 0.0
    kwargs: tuple = ()

    @property
    def grad_from_output(self) -> bool:
        return self.code in (IDENTITY, RELU, RELU6, SIGMOID, TANH) or (self.code == LEAKY_RELU and self.alpha > 0)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.name}({extra})" if extra else self.name


@functools.lru_cache(maxsize=64)
def _resolve_name(name: str) -> Activation:
    return _resolve(name)


def resolve(activation, **kwargs) -> Activation:
    """``"relu"``, ``"gelu", approximate="tanh"``, ``"leaky_relu", negative_slope=0.2``,
    ``None`` (identity), or an :class:`Activation` -> :class:`Activation`."""
    if isinstance(activation, Activation):
        if kwargs:
            raise TypeError(f"activation is already resolved ({activation}); do not pass {sorted(kwargs)}")
        return activation
    if not kwargs and isinstance(activation, str):
        return _resolve_name(activation)  # the common call: cached (Activation is frozen)
    return _resolve(activation, **kwargs)


def _resolve(activation, **kwargs) -> Activation:
    if activation is None:
        activation = "identity"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string such as 'relu', got {type(activation).__name__}")
    name = activation.lower()
    if name not in _TABLE:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(NAMES)}")
    code, defaults = _TABLE[name]
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"activation {name!r} takes no argument(s) {sorted(unknown)}"
                        + (f"; it takes {sorted(defaults)}" if defaults else ""))
    kw = {**defaults, **kwargs}
    alpha = 0.0
    if name == "leaky_relu":
        alpha = float(kw["negative_slope"])
        if not math.isfinite(alpha):
            raise ValueError(f"negative_slope must be finite, got {alpha}")
    if name == "gelu":
        if kw["approximate"] not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {kw['approximate']!r}")
        if kw["approximate"] == "tanh":
            code = GELU_TANH
    shown = tuple((k, v) for k, v in kw.items() if v != defaults[k] or name == "leaky_relu")
    return Activation(name, code, alpha, shown)


def apply(z: torch.Tensor, act: Activation) -> torch.Tensor:
    """Plain-torch forward (any dtype, float64 included)."""
    c = act.code
    if c == IDENTITY:
        return z
    if c == RELU:
        return F.relu(z)
    if c == RELU6:
        return F.relu6(z)
    if c == LEAKY_RELU:
        return F.leaky_relu(z, act.alpha)
    if c == GELU:
        return F.gelu(z)
    if c == GELU_TANH:
        return F.gelu(z, approximate="tanh")
    if c == SILU:
        return F.silu(z)
    if c == HARDSWISH:
        return F.hardswish(z)
    if c == SIGMOID:
        return torch.sigmoid(z)
    if c == TANH:
        return torch.tanh(z)
    if c == MISH:
        return F.mish(z)
    raise ValueError(f"unknown activation code {c}")


def derivative(s: torch.Tensor, act: Activation) -> torch.Tensor:
    """d act / d z in plain torch, from ``s`` = y (``grad_from_output``) or z."""
    c, one = act.code, torch.ones_like(s)
    if c == IDENTITY:
        return one
    if c == RELU:  # NaN -> 1, as torch's threshold_backward
        return (~(s <= 0)).to(s.dtype)
    if c == RELU6:  # NaN -> 0, as torch's (vectorised) hardtanh_backward
        return ((s > 0) & (s < 6)).to(s.dtype)
    if c == LEAKY_RELU:
        return torch.where(s > 0, one, one * act.alpha)
    if c == SIGMOID:
        return s * (1 - s)
    if c == TANH:
        return 1 - s * s
    # Smooth activations: s = z; torch's own backward formulas.
    g = torch.ones_like(s)
    if c == GELU:
        return torch.ops.aten.gelu_backward(g, s)
    if c == GELU_TANH:
        return torch.ops.aten.gelu_backward(g, s, approximate="tanh")
    if c == SILU:
        return torch.ops.aten.silu_backward(g, s)
    if c == HARDSWISH:
        return torch.ops.aten.hardswish_backward(g, s)
    if c == MISH:
        return torch.ops.aten.mish_backward(g, s)
    raise ValueError(f"unknown activation code {c}")


# oneDNN fused post-ops (torch.ops.mkldnn._convolution_pointwise): code -> (attr, scalars, algorithm)
# (a module constant: this is looked up on every fused conv call)
_ONEDNN = {
    IDENTITY: ("none", [], None), RELU: ("relu", [], None), RELU6: ("hardtanh", [0.0, 6.0], None),
    GELU: ("gelu", [], "none"), GELU_TANH: ("gelu", [], "tanh"), SILU: ("swish", [], None),
    HARDSWISH: ("hardswish", [], None), SIGMOID: ("sigmoid", [], None), TANH: ("tanh", [], None),
}  # Mish: no oneDNN post-op


def onednn_attr(act: Activation):
    if act.code == LEAKY_RELU:
        return ("leaky_relu", [act.alpha], None)
    return _ONEDNN.get(act.code)  # Mish: no oneDNN post-op
