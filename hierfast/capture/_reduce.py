"""Reduction of one layer's ``(N, ...)`` output to the 2-D features a statistic takes.

=============  =====================  ==================================================
policy         input                  features
=============  =====================  ==================================================
``flatten``    ``(N, ...)``           ``(N, prod(...))`` (default; conv maps included)
``avgpool``    ``(N, C, *spatial)``   ``(N, C)``: mean over the spatial positions
``mean``       ``(N, T, D)``          ``(N, D)``: mean over the tokens the mask keeps
``cls``        ``(N, T, D)``          ``(N, D)``: token 0
``tokens``     ``(N, T, D)``          ``(n_kept, D)``: every kept token is a sample
=============  =====================  ==================================================

The mask is the batch's ``attention_mask`` ``(N, T)`` (1 = real token); without one every
token counts. ``tokens`` makes tokens the samples, so every layer compared with it must
use ``tokens`` too. A callable ``f(x, mask) -> (M, d)`` is also accepted.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch

POLICIES = ("flatten", "avgpool", "mean", "cls", "tokens")


def _seq(x: torch.Tensor, name: str, policy: str, mask):
    if x.dim() != 3:
        raise ValueError(f"reduce={policy!r} needs (N, T, D) sequence outputs but layer {name!r} returned shape "
                         f"{tuple(x.shape)}; use 'flatten' or 'avgpool' for it (reduce={{'{name}': 'flatten'}})")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but layer {name!r} returned (N, T) = "
                         f"{tuple(x.shape[:2])}; reduce this layer with 'flatten' or 'cls'")
    return x


def reduce_output(x: torch.Tensor, policy, name: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``policy`` (a name from :data:`POLICIES` or a callable) to layer ``name``'s output."""
    if callable(policy):
        return policy(x, mask)
    if x.dim() == 0:
        raise ValueError(f"layer {name!r} returned a scalar; it has no batch dimension to record")
    if policy == "flatten":
        return x.reshape(x.shape[0], -1)
    if policy == "avgpool":
        if x.dim() < 3:
            raise ValueError(f"reduce='avgpool' needs (N, C, *spatial) outputs but layer {name!r} returned shape "
                             f"{tuple(x.shape)}; use 'flatten' for it")
        return x.mean(dim=tuple(range(2, x.dim())))
    if policy == "cls":
        return _seq(x, name, policy, None)[:, 0]
    if policy == "mean":
        x = _seq(x, name, policy, mask)
        if mask is None:
            return x.mean(dim=1)
        m = mask.to(x.dtype).unsqueeze(-1)
        # a row with no kept token would divide by zero: it is an input error, reported
        cnt = m.sum(dim=1)
        if bool((cnt == 0).any()):
            raise ValueError(f"attention_mask keeps no token for some sample (layer {name!r}); reduce='mean' "
                             "needs at least one real token per sample")
        return (x * m).sum(dim=1) / cnt
    if policy == "tokens":
        x = _seq(x, name, policy, mask)
        if mask is None:
            return x.reshape(-1, x.shape[-1])
        return x[mask.bool()]
    raise ValueError(f"reduce must be one of {POLICIES}, a callable f(x, mask), or a dict mapping layer names/"
                     f"globs to these; got {policy!r} for layer {name!r}")


def policy_for(reduce, name: str):
    """The policy of layer ``name`` under ``reduce`` (a policy, or a dict of name/glob -> policy
    where the first matching key wins and ``"*"`` may give a fallback; default ``flatten``)."""
    if isinstance(reduce, Mapping):
        base = name.split("#")[0]
        for k, v in reduce.items():
            if k == base or fnmatch.fnmatchcase(base, k):
                return v
        return "flatten"
    return reduce


def check_policy(reduce) -> None:
    vals = reduce.values() if isinstance(reduce, Mapping) else [reduce]
    for v in vals:
        if not (callable(v) or v in POLICIES):
            raise ValueError(f"reduce must be one of {POLICIES}, a callable f(x, mask), or a dict mapping layer "
                             f"names/globs to these; got {v!r}")
