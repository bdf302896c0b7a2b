"""The demo report's "what each layer responds to" section: for a few channels of every conv
layer, the synthesised image that maximises the channel (:func:`hierfast.visualize.
activation_maximization`) beside the receptive-field crop of the held-out digit that
excites it most (:func:`hierfast.visualize.top_activating`)."""
from __future__ import annotations

import base64
import io

import torch

from .visualize import activation_maximization, top_activating


def responds_to_html(model, x: torch.Tensor, y: torch.Tensor, layers: list[str], *, channels_per_layer: int = 4,
                     steps: int = 64, seed: int = 0, batch: int = 60) -> str:
    """HTML (one embedded PNG and a caption) for the report's extra section."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    top = top_activating(model, data, layers, k=1)
    ncol = channels_per_layer
    fig, axes = plt.subplots(len(layers), 2 * ncol, figsize=(1.25 * 2 * ncol, 1.35 * len(layers)),
                             squeeze=False, constrained_layout=True)
    for r, layer in enumerate(layers):
        t = top[layer]
        chans = torch.argsort(t.values[:, 0], descending=True)[:ncol].tolist()  # the most responsive
        vis = activation_maximization(model, layer, channels=chans, steps=steps, size=x.shape[-1],
                                      param="pixel", seed=seed, progress=False)
        for c, ch in enumerate(chans):
            ax_s, ax_t = axes[r][2 * c], axes[r][2 * c + 1]
            ax_s.imshow(vis.images[c].mean(0).cpu().numpy(), cmap="gray")
            r0, c0, r1, c1 = (int(v) for v in t.boxes[ch, 0].tolist())
            idx = int(t.indices[ch, 0])
            ax_t.imshow(x[idx, 0, r0:r1, c0:c1].cpu().numpy(), cmap="gray")
            ax_s.set_title(f"{layer} ch{ch}", fontsize=7)
            ax_t.set_title(f"top: digit {int(y[idx])}", fontsize=7)
            for ax in (ax_s, ax_t):
                ax.set_xticks([])
                ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f"<figure><img alt='what each layer responds to' src='{uri}'><figcaption>For the {ncol} most responsive "
            "channels of each conv layer (rows, input to output): left, the image synthesised to maximise the "
            "channel's mean pre-activation (activation maximisation, all channels of a layer in one batched "
            f"optimisation, {steps} steps); right, the receptive-field crop of the held-out digit that excites the "
            "channel most. Early layers respond to strokes and edges in small windows; later layers to larger "
            "parts of the digit.</figcaption></figure>")
