"""Grids of channel images (matplotlib, imported on first use)."""
from __future__ import annotations

import math

import torch


def plot_channels(images, titles=None, ncols: int = 8, *, size: float = 1.6):
    """A matplotlib Figure showing ``images`` in a grid.

    Args:
        images: ``(C, 3, H, W)`` or ``(C, 1, H, W)`` / ``(C, H, W)`` tensor in [0, 1], or a
            :class:`~hierfast.visualize.Visualization` (its channels become the titles).
        titles: optional list of ``C`` strings.
        ncols: images per row. size: inches per image.
    """
    if hasattr(images, "images") and hasattr(images, "channels"):
        if titles is None:
            titles = [f"{images.layer}:{c}" for c in images.channels]
        images = images.images
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (C, 3, H, W) or a Visualization, got {type(images).__name__}")
    if images.dim() == 5:  # (C, S, 3, H, W) diversity samples: one row per channel
        ncols = images.shape[1]
        if titles is not None:
            titles = [t for t in titles for _ in range(ncols)]
        images = images.flatten(0, 1)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (C, 3, H, W), (C, 1, H, W) or (C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    ncols = min(ncols, max(n, 1))
    nrows = max(math.ceil(n / ncols), 1)
    from matplotlib.figure import Figure  # lazy: matplotlib is only needed for figures

    fig = Figure(figsize=(ncols * size, nrows * size))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(arr[i, :, :, 0] if arr.shape[3] == 1 else arr[i], cmap="gray" if arr.shape[3] == 1 else None,
                      vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    fig.tight_layout()
    return fig
