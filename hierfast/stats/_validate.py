"""Input validation for the statistics (DESIGN.md principle 6: validate at the boundary)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .._compile import is_compiling

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_features(x, name: str, *, min_n: int = 2, check_finite: bool = True) -> torch.Tensor:
    """Validate one layer's features ``(n, ...)`` and flatten them to ``(n, d)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, ...), got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {x.dtype}; features must be float16, bfloat16, float32 or float64 "
                        "(convert with .float())")
    if x.dim() == 0:
        raise ValueError(f"{name} is a scalar; features must have shape (n, ...) with n samples first")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least {min_n} samples with >= 1 feature")
    n = x.shape[0]
    if n < min_n:
        raise ValueError(f"{name} has n={n} samples; this estimator needs n >= {min_n}"
                         + (" (the unbiased HSIC divides by n-3)" if min_n == 4 else ""))
    x = x.reshape(n, -1)
    if check_finite and not is_compiling() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero()[0].item()
        raise ValueError(f"{name} contains NaN or inf (first at sample {bad}); CKA of non-finite features is "
                         "undefined: check the model and inputs")
    return x


def as_layers(feats, name: str) -> tuple[list[str] | None, list[torch.Tensor]]:
    """``list``/``tuple``/``dict`` of per-layer tensors -> (names or None, tensors)."""
    if isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a list, tuple or dict of (n, ...) tensors, one per layer; got a single "
                        f"tensor (wrap it: [{name}])")
    if isinstance(feats, Mapping):
        names = [str(k) for k in feats]
        tensors = list(feats.values())
    elif isinstance(feats, Sequence) and not isinstance(feats, (str, bytes)):
        names, tensors = None, list(feats)
    else:
        raise TypeError(f"{name} must be a list, tuple or dict of (n, ...) tensors, got {type(feats).__name__}")
    if not tensors:
        raise ValueError(f"{name} holds no layers; pass at least one (n, ...) tensor")
    return names, tensors


def layer_label(names: list[str] | None, i: int, prefix: str) -> str:
    return f"{prefix}[{names[i]!r}]" if names is not None else f"{prefix}[{i}]"


def check_same_batch(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> tuple[int, torch.device]:
    """All layers must have the same number of samples and live on one device."""
    n0, dev0 = tensors[0].shape[0], tensors[0].device
    for t, lab in zip(tensors, labels):
        if t.shape[0] != n0:
            raise ValueError(f"{lab} has {t.shape[0]} samples but {labels[0]} has {n0}; every layer (and both "
                             "models) must see the same inputs in the same order")
        if t.device != dev0:
            raise ValueError(f"{lab} is on {t.device} but {labels[0]} is on {dev0}; move all features to one "
                             "device (e.g. .to('cuda'))")
    return n0, dev0
