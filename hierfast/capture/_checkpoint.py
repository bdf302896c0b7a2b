"""Atomic checkpoints of an analysis: statistic states + the index of the next batch."""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "hierfast.analyze.checkpoint/1"


def rank_path(path, rank: int | None) -> Path:
    """Per-rank file when distributed (``ckpt.pt`` -> ``ckpt.rank1.pt``)."""
    p = Path(path)
    return p if rank is None else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def save(path: Path, payload: dict) -> None:
    """Write to a temporary file, fsync, then ``os.replace``: a kill leaves the old or the new
    checkpoint, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint={str(path)!r} is not a hierfast.analyze checkpoint; delete it or choose "
                         "another path")
    return state
