"""``hierfast demo``: train a small CNN on real handwritten digits and print its hierarchy.

The data are the 1,797 8x8 digit images that scikit-learn ships (no download). The
CNN is trained for a few epochs on 80 % of them; then the layer x layer debiased
CKA of the trained network on the held-out 20 % is streamed through
:class:`hierfast.stats.MinibatchCKA`, together with trained-vs-initial CKA per
layer (how much training changed each layer).
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn


def load_digits_tensors(seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without sklearn
        raise SystemExit("the demo uses the digits data set that scikit-learn ships: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    tr, te = perm[:split], perm[split:]
    return x[tr], y[tr], x[te], y[te]


def make_cnn() -> nn.Sequential:
    """Four conv blocks and a linear head on 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


LAYER_NAMES = ["relu1", "relu2", "relu3", "relu4", "logits"]


def layer_features(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the four ReLUs and the logits (a plain pass through the Sequential)."""
    feats, h = {}, x
    relu_i = 0
    for module in model:
        h = module(h)
        if isinstance(module, nn.ReLU):
            relu_i += 1
            feats[f"relu{relu_i}"] = h
    feats["logits"] = h
    return feats


def train(model, x, y, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def format_matrix(m: torch.Tensor, rows, cols) -> str:
    width = max(len(c) for c in cols) + 2
    head = " " * 10 + "".join(f"{c:>{width}}" for c in cols)
    lines = [head] + [f"{r:<10}" + "".join(f"{v:>{width}.3f}" for v in row.tolist()) for r, row in zip(rows, m)]
    return "\n".join(lines)


def run_demo(quick: bool = False, seed: int = 0) -> int:
    from .stats import MinibatchCKA

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    model = make_cnn()
    initial = make_cnn()
    initial.load_state_dict(model.state_dict())
    train(model, x_tr, y_tr, epochs=3 if quick else 12, seed=seed)
    model.eval()
    initial.eval()
    with torch.inference_mode():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        within, versus = MinibatchCKA(), MinibatchCKA()
        for i in range(0, len(y_te), 60):
            if len(y_te) - i < 4:
                break
            ft = layer_features(model, x_te[i:i + 60])
            fi = layer_features(initial, x_te[i:i + 60])
            within.update(ft)
            versus.update(ft, fi)
    m = within.compute()
    v = versus.compute().diagonal()
    print(f"hierfast demo: CNN on scikit-learn digits ({len(y_tr)} train / {len(y_te)} held-out images)")
    print(f"held-out accuracy: {acc:.3f}\n")
    print("Debiased minibatch CKA between layers of the trained network (held-out data):")
    print(format_matrix(m, LAYER_NAMES, LAYER_NAMES))
    print("\nCKA of each trained layer with the same layer at initialisation (1 = unchanged):")
    print("  " + "  ".join(f"{n}={c:.3f}" for n, c in zip(LAYER_NAMES, v.tolist())))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    sys.stdout.flush()
    return 0
