"""Results of :func:`hierfast.analyze`: layer names, shapes, counts and one value per statistic."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

_META = ("layers", "layers_b", "shapes", "shapes_b", "n_samples", "n_batches", "n_skipped", "skipped_small",
         "stats", "config")


def _plain(v):
    """Inference tensors (made under inference_mode) -> ordinary CPU tensors, recursively."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def _encode(v, key: str, arrays: dict):
    if isinstance(v, torch.Tensor):
        arrays[key] = v.numpy()
        return {"__array__": key, "kind": "torch"}
    if isinstance(v, np.ndarray):
        arrays[key] = v
        return {"__array__": key, "kind": "numpy"}
    if isinstance(v, dict):
        return {"__dict__": {str(k): _encode(x, f"{key}/{k}", arrays) for k, x in v.items()}}
    if isinstance(v, (list, tuple)):
        return [_encode(x, f"{key}/{i}", arrays) for i, x in enumerate(v)]
    if isinstance(v, (np.generic,)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot save a value of type {type(v).__name__} (at {key!r}); statistics must compute "
                    "tensors, arrays, numbers, strings, or lists/dicts of these")


def _decode(v, arrays):
    if isinstance(v, dict) and "__array__" in v:
        a = arrays[v["__array__"]]
        return torch.from_numpy(a.copy()) if v["kind"] == "torch" else a
    if isinstance(v, dict) and "__dict__" in v:
        return {k: _decode(x, arrays) for k, x in v["__dict__"].items()}
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    return v


class Results:
    """What :func:`hierfast.analyze` measured.

    Attributes:
        layers: recorded layer names of the model, in run order (``name#k``: k-th extra call).
        layers_b: the same for ``compare_to`` (None without it).
        shapes / shapes_b: ``{name: per-sample output shape}`` before reduction.
        n_samples: samples counted (summed over ranks); n_batches, n_skipped likewise.
        skipped_small: ``{statistic: batches}`` left out of that statistic only, for having fewer
            samples than it needs (a ragged last batch of 1 for ``"cka"``, which needs 4); that
            statistic saw ``n_batches - skipped_small[name]`` batches.
        cka: ``(La, Lb)`` float64 CKA matrix (with ``stats=("cka", ...)``); every other
            statistic ``s`` of ``stats`` is available as ``results.s``.
    """

    def __init__(self, *, layers, layers_b, shapes, shapes_b, n_samples, n_batches, n_skipped=0,
                 values: dict[str, Any], config: dict | None = None, skipped_small: dict | None = None) -> None:
        self.layers = list(layers)
        self.layers_b = list(layers_b) if layers_b is not None else None
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.shapes_b = {k: tuple(v) for k, v in shapes_b.items()} if shapes_b is not None else None
        self.n_samples, self.n_batches, self.n_skipped = int(n_samples), int(n_batches), int(n_skipped)
        self.values = {k: _plain(v) for k, v in values.items()}
        self.stats = list(self.values)
        self.skipped_small = {k: int((skipped_small or {}).get(k, 0)) for k in self.stats}
        self.config = dict(config or {})

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"Results has no attribute {name!r}; statistics computed: {list(values)}")

    def __repr__(self) -> str:
        lb = f", layers_b={len(self.layers_b)}" if self.layers_b is not None else ""
        return (f"Results(layers={len(self.layers)}{lb}, n_samples={self.n_samples}, n_batches={self.n_batches}, "
                f"stats={self.stats})")

    # -- export ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-friendly dict: metadata plus every statistic (tensors as nested lists)."""
        def lists(v):
            if isinstance(v, (torch.Tensor, np.ndarray)):
                return v.tolist()
            if isinstance(v, dict):
                return {k: lists(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [lists(x) for x in v]
            return v
        out = self._meta()
        out.update({k: lists(v) for k, v in self.values.items()})
        return out

    def _meta(self) -> dict:
        return {"layers": self.layers, "layers_b": self.layers_b,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "shapes_b": {k: list(v) for k, v in self.shapes_b.items()} if self.shapes_b is not None else None,
                "n_samples": self.n_samples, "n_batches": self.n_batches, "n_skipped": self.n_skipped,
                "skipped_small": self.skipped_small, "stats": self.stats, "config": self.config}

    @staticmethod
    def _paths(path) -> tuple[Path, Path]:
        p = Path(path)
        if p.suffix == ".json":
            return p, p.with_suffix(".npz")
        return p / "results.json", p / "results.npz"

    def save(self, path) -> Path:
        """Write ``<path>/results.json`` (metadata, numbers) and ``results.npz`` (arrays); a
        path ending in ``.json`` names the JSON file itself (the ``.npz`` goes beside it).
        Returns the JSON path."""
        pj, pn = self._paths(path)
        pj.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict = {}
        meta = self._meta()
        meta["values"] = {k: _encode(v, k, arrays) for k, v in self.values.items()}
        meta["format"] = "hierfast.Results/1"
        np.savez(pn, **arrays)
        pj.write_text(json.dumps(meta, indent=1))
        return pj

    @classmethod
    def load(cls, path) -> "Results":
        """Read what :meth:`save` wrote (same ``path``)."""
        pj, pn = cls._paths(path)
        if not pj.exists():
            raise FileNotFoundError(f"{pj} does not exist; pass the directory (or .json file) given to save()")
        meta = cls._read_meta(pj)
        with np.load(pn, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        values = {k: _decode(v, arrays) for k, v in meta["values"].items()}
        return cls(layers=meta["layers"], layers_b=meta["layers_b"], shapes=meta["shapes"],
                   shapes_b=meta["shapes_b"], n_samples=meta["n_samples"], n_batches=meta["n_batches"],
                   n_skipped=meta["n_skipped"], values=values, config=meta.get("config"),
                   skipped_small=meta.get("skipped_small"))

    @staticmethod
    def _read_meta(pj: Path) -> dict:
        """The JSON half of :meth:`save`; ValueError naming the file when it is not one."""
        try:
            meta = json.loads(pj.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{pj} is not valid JSON ({e}); pass a results.json written by Results.save "
                             "(hierfast analyze --out)") from None
        missing = [k for k in ("layers", "values") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(f"{pj} is not a results.json written by Results.save (no {missing}); pass the "
                             "directory given to hierfast analyze --out")
        return meta

    # -- plot ------------------------------------------------------------------------------
    def plot_cka(self, ax=None, *, cmap: str = "magma", title: str | None = None):
        """Heatmap of ``cka`` with layer names on the axes (rows: model, columns: compare_to).
        Needs matplotlib (``pip install hierfast[plot]``). Returns the Axes."""
        if "cka" not in self.values:
            raise ValueError(f"these Results have no 'cka' (statistics: {self.stats}); run analyze with stats=('cka',)")
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("plot_cka needs matplotlib: pip install matplotlib (or hierfast[plot])") from e
        m = self.values["cka"].numpy()
        rows = self.layers
        cols = self.layers_b if self.layers_b is not None else self.layers
        if ax is None:
            size = max(4.0, 0.3 * max(len(rows), len(cols)) + 2)
            _, ax = plt.subplots(figsize=(size + 1, size))
        im = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
        ax.set_ylabel("model" if self.layers_b is not None else "layer")
        ax.set_xlabel("compare_to" if self.layers_b is not None else "layer")
        ax.set_title(title or f"debiased minibatch CKA, {self.n_samples} samples")
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        return ax
