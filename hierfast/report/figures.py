"""Report figures (matplotlib, Agg backend). Each function returns a Figure; the caller saves it."""
from __future__ import annotations

import numpy as np

from .schema import as_array


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _plain(text) -> str:
    """User text (layer, transform, model names) drawn literally: matplotlib would read
    ``$...$`` as mathtext (wrong glyphs, or a ParseFatalException); an escaped dollar is
    drawn as a dollar."""
    return str(text).replace("$", r"\$")


def _plain_all(names) -> list[str]:
    return [_plain(n) for n in names]


def cka_heatmap(matrix, rows: list[str], cols: list[str] | None = None, *, title: str = "CKA",
                xlabel: str = "layer", ylabel: str = "layer", ax=None):
    """Heatmap of a CKA matrix in [0, 1] with layer names and values in the cells (when small)."""
    plt = _plt()
    m = as_array(matrix)
    cols = rows if cols is None else cols
    fig = None
    if ax is None:
        size = 2.2 + 0.45 * max(len(rows), len(cols))
        fig, ax = plt.subplots(figsize=(size + 1.2, size), constrained_layout=True)
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="upper")
    ax.set_xticks(range(len(cols)), _plain_all(cols), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), _plain_all(rows), fontsize=8)
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title))
    if m.size <= 256:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 else "white")
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label="CKA (1 = same representation)")
    return fig or ax.figure


def depth_curves(layers: list[str], series: dict, *, ylabel: str, title: str, errors: dict | None = None,
                 ylim=None, hline: float | None = None, hline_label: str | None = None):
    """One line per entry of ``series`` ({label: [L values]}) against layer depth."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 3.8), constrained_layout=True)
    x = np.arange(len(layers))
    for label, vals in series.items():
        v = as_array(vals)
        err = None if errors is None or label not in errors else as_array(errors[label])
        ax.errorbar(x, v, yerr=err, marker="o", ms=4, capsize=3 if err is not None else 0, label=_plain(label))
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label=None if hline_label is None else _plain(hline_label))
    ax.set_xticks(x, _plain_all(layers), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def invariance_curves(layers: list[str], invariance: dict):
    """Invariance vs depth, one panel per transform, one line per magnitude."""
    plt = _plt()
    names = list(invariance)
    ncol = min(2, len(names))
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.4 * nrow), squeeze=False,
                             constrained_layout=True)
    x = np.arange(len(layers))
    for k, t in enumerate(names):
        ax = axes[k // ncol][k % ncol]
        mags = as_array(invariance[t]["magnitudes"])
        score = as_array(invariance[t]["score"])
        colours = plt.cm.viridis(np.linspace(0.1, 0.9, len(mags)))
        for i, m in enumerate(mags):
            ax.plot(x, score[i], marker="o", ms=3, color=colours[i], label=f"{m:g}")
        ax.set_xticks(x, _plain_all(layers), rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("invariance (NIS; 1 = invariant)")
        ax.set_title(_plain(t))
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(title="magnitude", fontsize=7, title_fontsize=7)
    for k in range(len(names), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    return fig
