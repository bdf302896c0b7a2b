"""Pick the tensor to record from whatever a module returns.

Default policy (documented in :class:`~hierfast.capture.LayerCapture`):
- a tensor: itself;
- an object with ``last_hidden_state`` (Hugging Face ``ModelOutput``): that attribute;
- a dict: ``"last_hidden_state"`` if present, else its first tensor value;
- a tuple/list (``nn.LSTM``'s ``(output, (h, c))``, ``nn.MultiheadAttention``'s
  ``(output, weights)``, Hugging Face tuples): its first tensor, searched depth-first.
Modules whose ``batch_first`` is False (``nn.LSTM``/``GRU``/``RNN``, ``nn.MultiheadAttention``,
``nn.Transformer*Layer`` built without ``batch_first=True``) return ``(T, N, ...)``, and so do
the modules inside them: the default policy transposes these to ``(N, T, ...)``. (Other
time-major code cannot be detected; the engine then reports that a layer gave a number of
rows different from the batch size, and ``output_fn`` can fix the layout.) An ``output_fn`` must itself return ``(N, ...)``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def first_tensor(out):
    """The default choice described in the module docstring, or None if there is no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    lhs = getattr(out, "last_hidden_state", None)
    if isinstance(lhs, torch.Tensor):
        return lhs
    if isinstance(out, Mapping):
        if isinstance(out.get("last_hidden_state"), torch.Tensor):
            return out["last_hidden_state"]
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    else:
        return None
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def seq_first(module: nn.Module) -> bool:
    """True when ``module`` returns time-major ``(T, N, ...)`` outputs (``batch_first=False``)."""
    bf = getattr(module, "batch_first", None)
    if bf is None:
        attn = getattr(module, "self_attn", None)
        bf = getattr(attn, "batch_first", None)
    return bf is False


_TIME_MAJOR_BLOCKS = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def time_major_names(model: nn.Module) -> set[str]:
    """Names of the modules that return ``(T, N, ...)``: recurrent/attention blocks built with
    ``batch_first=False`` and every module inside them (e.g. the ``linear1`` of such a
    ``TransformerEncoderLayer`` sees ``(T, N, D)`` too)."""
    out: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, _TIME_MAJOR_BLOCKS) and seq_first(m):
            out.update(f"{name}.{sub}" if name and sub else (name or sub) for sub, _ in m.named_modules())
    return out


def pick_output(module: nn.Module, out, name: str, output_fn=None, time_major: bool | None = None) -> torch.Tensor:
    """Apply ``output_fn`` (one argument: the output) or the default policy; returns ``(N, ...)``.
    ``time_major``: transpose dims 0 and 1 (default: ``seq_first(module)``)."""
    if output_fn is not None:
        t = output_fn(out)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"output_fn returned {type(t).__name__} for layer {name!r}; it must return the "
                            "(N, ...) tensor to record")
        return t
    t = first_tensor(out)
    if t is None:
        raise TypeError(f"layer {name!r} ({type(module).__name__}) returned {type(out).__name__} with no tensor "
                        "in it; pass output_fn=lambda out: ... to pick the tensor to record, or do not select it")
    if (seq_first(module) if time_major is None else time_major) and t.dim() >= 2:
        t = t.transpose(0, 1)
    return t


def _takes_three(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(pos) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
