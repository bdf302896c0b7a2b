"""Atomic checkpoints of an analysis: statistic states, the index of the next batch, and a
fingerprint of the configuration (a resume must match it)."""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
from pathlib import Path

import torch
from torch.nn.parameter import UninitializedTensorMixin

FORMAT = "hierfast.analyze.checkpoint/1"


def rank_path(path, rank: int | None) -> Path:
    """Per-rank file when distributed (``ckpt.pt`` -> ``ckpt.rank1.pt``)."""
    p = Path(path)
    return p if rank is None else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def save(path: Path, payload: dict) -> None:
    """Write to a temporary file, fsync, then ``os.replace``: a kill leaves the old or the new
    checkpoint, never a torn one. Temporary files of this checkpoint that a kill mid-save left
    behind (another process id) are removed afterwards, so they do not accumulate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path) -> None:
    """Delete ``name.tmp<pid>`` siblings of ``path``: one file per rank means no other live
    process writes this checkpoint, so they are leftovers of killed saves."""
    prefix = path.name + ".tmp"
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        if p.name[len(prefix):].isdigit():
            with contextlib.suppress(OSError):  # already gone, or not ours to delete
                p.unlink()


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torn or foreign file (not: permissions)
        raise ValueError(f"checkpoint={str(path)!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is "
                         "corrupt or not a hierfast.analyze checkpoint: delete it to start fresh, or choose another "
                         "path") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint={str(path)!r} is not a hierfast.analyze checkpoint; delete it or choose "
                         "another path")
    return state


def describe(v, depth: int = 0):
    """A stable, ``torch.save``-able description of an option value: equal for equal
    configurations across processes (no memory addresses)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth > 6:
        return type(v).__qualname__
    if isinstance(v, (list, tuple)):
        return [describe(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {str(k): describe(x, depth + 1) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {v.dtype} sum={float(v.detach().double().sum()):.17g}"
    if isinstance(v, type) or (callable(v) and not hasattr(v, "__dict__")) or hasattr(v, "__code__"):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__qualname__)}"
    if not hasattr(v, "__dict__"):
        r = repr(v)
        return type(v).__qualname__ if " at 0x" in r else r  # an address differs in every process
    fields = {k: describe(x, depth + 1) for k, x in sorted(vars(v).items()) if not k.startswith("_")}
    return {"type": f"{type(v).__module__}.{type(v).__qualname__}", "fields": fields}


def layer_shapes(cap) -> dict:
    """``{layer: [shape of each parameter and buffer]}`` of a capture's selected modules: the
    same names in a model of other widths give other shapes. A lazy module's parameters have
    no shape before the first forward: recorded as ``"uninitialized"`` (a fresh lazy model of
    the resumed call records the same)."""
    return {name: [_shape(t) for t in mod.state_dict().values()] for name, mod in cap.modules}


def _shape(t):
    return "uninitialized" if isinstance(t, UninitializedTensorMixin) else list(t.shape)


def fingerprint(specs, reduce, output_fn, cap_a, cap_b) -> dict:
    """What an analysis' result depends on besides the data: a resume must match it."""
    return {"reduce": describe(reduce), "output_fn": describe(output_fn),
            "stats": {name: describe(opts) for name, opts in specs},
            "compare_to": "absent" if cap_b is None else "present",
            "layers": cap_a.names, "layers_b": cap_b.names if cap_b is not None else None,
            "shapes": layer_shapes(cap_a), "shapes_b": layer_shapes(cap_b) if cap_b is not None else None}


def check_config(path: Path, saved: dict | None, now: dict) -> None:
    """Raise ValueError listing what differs between the checkpoint's configuration and this
    call's; warn for a checkpoint of an older version, which recorded none."""
    if saved is None:
        import warnings

        warnings.warn(f"checkpoint={str(path)!r} was written by an older hierfast without a record of its "
                      "configuration: only statistic and layer names are checked (not reduce, options, compare_to "
                      "or layer shapes); delete it if this call differs from the one that wrote it",
                      RuntimeWarning, stacklevel=3)
        return
    diffs = [_diff(k, saved.get(k), now[k]) for k in now if saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"checkpoint={str(path)!r} was written by an analysis with another configuration: "
                         + "; ".join(diffs) + ". Resuming would mix the two; delete the file to start fresh, or "
                         "pass another checkpoint path")


def _diff(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)][:3]
        return f"{key} of {keys} differ ({[old.get(k) for k in keys]} in the checkpoint, " \
               f"{[new.get(k) for k in keys]} now)"
    return f"{key}: {_short(old)} in the checkpoint, {_short(new)} now"


def _short(v, n: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."
