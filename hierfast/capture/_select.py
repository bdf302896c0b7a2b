"""Which modules of a model to record: exact names, glob patterns, module types, a predicate.

The default is the output of every conv, linear, recurrent and attention block; the final
order of the recorded layers is the order in which they run (set by the first forward).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

# Module types recorded by default (``layers=None``).
DEFAULT_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
)


def _is_default(m: nn.Module) -> bool:
    # Hugging Face (and most hand-written) attention blocks are named *Attention.
    return isinstance(m, DEFAULT_TYPES) or type(m).__name__.endswith("Attention")


def named_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule except the root, each module once (shared modules
    keep their first name, as ``named_modules`` does)."""
    return [(n, m) for n, m in model.named_modules() if n]


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "(none similar)"


def select_layers(model: nn.Module, layers=None, *, arg: str = "layers") -> list[tuple[str, nn.Module]]:
    """Resolve a selection to ``[(name, module), ...]`` in ``named_modules`` order.

    Args:
        model: the network.
        layers: None (default types), a string (exact name or glob such as ``"layer*.conv1"``),
            a module type (``nn.Conv2d``), a predicate ``f(name, module) -> bool``, or a list
            mixing these (union).
        arg: argument name used in error messages.

    Raises:
        ValueError: an exact name that is not a submodule (the message lists the closest
            names), a pattern/type that matches nothing, or an empty overall selection. An
            alias of a shared module (``self.shared = self.a``) selects it under its first
            name (``"a"``), as ``named_modules`` lists it.
        TypeError: an entry of an unsupported kind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cands = named_candidates(model)
    names = [n for n, _ in cands]
    if layers is None:
        chosen = {n for n, m in cands if _is_default(m)}
        if not chosen:
            raise ValueError(f"no layer matched: {type(model).__name__} has no conv, linear, recurrent or "
                             f"attention submodule; pass {arg}= (names, glob patterns, module types or a "
                             f"predicate). Its submodules: {names[:20]}")
        return [(n, m) for n, m in cands if n in chosen]
    specs = list(layers) if isinstance(layers, (list, tuple, set)) else [layers]
    chosen: set[str] = set()
    for s in specs:
        if isinstance(s, str):
            if any(c in s for c in "*?["):
                hit = [n for n in names if fnmatch.fnmatchcase(n, s)]
                if not hit:
                    raise ValueError(f"{arg} pattern {s!r} matches no submodule; closest names: "
                                     f"{_closest(s, names)}")
            elif s in names:
                hit = [s]
            elif (alias := alias_of(model, s)) is not None:
                hit = [alias]
            else:
                raise ValueError(f"{arg}: {type(model).__name__} has no submodule named {s!r}; closest names: "
                                 f"{_closest(s, names)} (see model.named_modules())")
        elif isinstance(s, type) and issubclass(s, nn.Module):
            hit = [n for n, m in cands if isinstance(m, s)]
            if not hit:
                raise ValueError(f"{arg}: no submodule of {type(model).__name__} is a {s.__name__}")
        elif callable(s):
            hit = [n for n, m in cands if _call_pred(s, n, m)]
        else:
            raise TypeError(f"{arg} entries must be names, glob strings, nn.Module types or predicates "
                            f"f(name, module) -> bool; got {type(s).__name__}")
        chosen.update(hit)
    if not chosen:
        raise ValueError(f"no layer matched {arg}={layers!r}; submodules are: {names[:20]}"
                         + (" ..." if len(names) > 20 else ""))
    return [(n, m) for n, m in cands if n in chosen]


def alias_of(model: nn.Module, name: str) -> str | None:
    """The ``named_modules`` name of the module that ``name`` reaches through an alias
    (``self.shared = self.a``: ``"shared"`` -> ``"a"``), or None if it names no submodule."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        return None
    return next((n for n, m in named_candidates(model) if m is target), None)


def _call_pred(pred: Callable, name: str, module: nn.Module) -> bool:
    return bool(pred(name, module))
