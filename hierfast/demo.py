"""``hierfast demo``: train a small CNN on real handwritten digits and measure its hierarchy.

The data are the 1,797 8x8 digit images that scikit-learn ships (no download), upsampled
to 16x16. A CNN of six :class:`hierfast.nn.Conv2dAct` blocks is trained on 60 % of them;
then the trained network *and* the same network at initialisation are measured on the
held-out 40 % with every statistic hierfast has — layer x layer CKA, invariance to
translation, rotation, noise and blur, linear probes with a control task, intrinsic
dimension and participation ratio, sparsity — and ``report.html`` (one self-contained
file), the PNG figures and ``results.json`` are written to ``--out``.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 16
CHANNELS = (16, 32, 32, 64, 64, 64)
STRIDES = (1, 1, 2, 1, 2, 1)
LAYERS = [f"conv{i + 1}" for i in range(len(CHANNELS))] + ["head"]
TRAIN_FRACTION = 0.6  # the rest is held out: the analysis (and its probes) see only unseen digits


def load_digits_split(seed: int = 0, size: int = IMAGE_SIZE):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, size, size) standardised
    with the training mean/std, int64 labels; a TRAIN_FRACTION split drawn with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without sklearn
        raise SystemExit("the demo uses the digits data set that scikit-learn ships: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(TRAIN_FRACTION * len(y))
    tr, te = perm[:split], perm[split:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def make_demo_cnn() -> nn.Sequential:
    """Six fused conv + ReLU blocks (each followed by BatchNorm), global pooling, a linear head."""
    from .nn import Conv2dAct

    blocks: list[tuple[str, nn.Module]] = []
    c_in = 1
    for i, (c, s) in enumerate(zip(CHANNELS, STRIDES)):
        blocks.append((f"conv{i + 1}", Conv2dAct(c_in, c, 3, stride=s, padding=1, activation="relu")))
        blocks.append((f"bn{i + 1}", nn.BatchNorm2d(c)))
        c_in = c
    blocks += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(c_in, 10))]
    return nn.Sequential(OrderedDict(blocks))


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress or not sys.stderr.isatty(), leave=False)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
          progress: bool = True, batch: int = 64) -> None:
    """AdamW with a one-cycle schedule and random 1-pixel shifts; deterministic under ``seed``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    with _bar(steps, "training", progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch):
                idx = perm[i:i + batch]
                shift = torch.randint(-1, 2, (2,), generator=g).tolist()
                xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
                opt.zero_grad()
                F.cross_entropy(model(xb), y[idx]).backward()
                opt.step()
                sched.step()
                bar.update()
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def format_matrix(m, rows, cols) -> str:
    width = max(len(c) for c in cols) + 2
    head = " " * 8 + "".join(f"{c:>{width}}" for c in cols)
    lines = [head] + [f"{r:<8}" + "".join(f"{v:>{width}.3f}" for v in row) for r, row in zip(rows, m)]
    return "\n".join(lines)


CHECKPOINT = Path("checkpoint") / "trained.pt"


def check_out_dir(out: Path, command: str) -> bool:
    """Create ``out`` and check it is writable; False (after a one-line error naming ``command``)
    when not, so a run fails before any work rather than after it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hierfast-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"{command}: cannot write to {out} ({e.strerror or e}); pass --out with a writable directory",
              file=sys.stderr)
        return False
    return True


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a run killed mid-write leaves the previous checkpoint (or none), never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, *, seed: int, quick: bool) -> dict | None:
    """The saved training of the same configuration, or None (missing, other seed/mode, unreadable)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: retrain rather than fail
        print(f"hierfast demo: ignoring unreadable checkpoint {path} ({type(e).__name__}); retraining",
              file=sys.stderr)
        return None
    if state.get("format") != 1 or state.get("seed") != seed or state.get("quick") != quick:
        return None
    return state


def run_demo(out: str | Path = "hierfast-demo", *, quick: bool = False, seed: int = 0, device: str | None = None,
             progress: bool = True, restart: bool = False) -> int:
    """Train, measure, report. Returns the exit code (0; 2 when ``out`` is not writable).

    The trained weights are checkpointed to ``out/checkpoint/trained.pt`` right after training;
    running the same command again (same seed and mode) resumes from them and skips training,
    so an interrupted run loses nothing already done. ``restart=True`` retrains."""
    from .demo_analysis import measure
    from .report import write_report

    t0 = time.perf_counter()
    out = Path(out)
    if not check_out_dir(out, "hierfast demo"):
        return 2
    torch.manual_seed(seed)
    dev = torch.device(device) if device else torch.device("cpu")
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    model = make_demo_cnn()
    initial = copy.deepcopy(model)
    ckpt = out / CHECKPOINT
    saved = None if restart else _load_checkpoint(ckpt, seed=seed, quick=quick)
    if saved is not None:
        model.load_state_dict(saved["model"])
        initial.load_state_dict(saved["initial"])
        model.eval()
        print(f"resumed from {ckpt}: training skipped (pass --restart to retrain)")
    else:
        train(model, x_tr, y_tr, epochs=3 if quick else 8, seed=seed, progress=progress)
        _save_checkpoint(ckpt, {"format": 1, "seed": seed, "quick": quick, "model": model.state_dict(),
                                "initial": initial.state_dict()})
    acc = accuracy(model, x_te, y_te)
    t_train = time.perf_counter() - t0
    model.to(dev)
    initial.to(dev)
    analysis = measure(model, initial, x_te, y_te, layers=LAYERS, quick=quick, seed=seed, progress=progress)
    analysis["meta"] = {
        "model": f"CNN of {len(CHANNELS)} Conv2dAct(ReLU)+BatchNorm blocks, channels {list(CHANNELS)}",
        "data": f"scikit-learn digits upsampled to {IMAGE_SIZE}x{IMAGE_SIZE}: {len(y_tr)} train, "
                f"{len(y_te)} held-out images (accuracy on all; the statistics on the {analysis['n_samples']} "
                "in whole batches)",
        "held-out accuracy": f"{acc:.4f}",
        "seed": seed,
        "mode": "quick" if quick else "full",
        "device": str(dev),
        "training time (s)": f"{t_train:.1f}",
    }
    analysis["accuracy"] = acc
    from .demo_visual import responds_to_html

    visual = responds_to_html(model, x_te.to(dev), y_te.to(dev), LAYERS[:-1], steps=24 if quick else 96, seed=seed)
    written = write_report(analysis, out, title="hierfast demo: the hierarchy of a digit classifier",
                           intro="A small CNN trained on real handwritten digits, measured layer by layer on "
                                 "held-out images, against the same network at initialisation.",
                           extra_sections=[("What each layer responds to", visual)])
    analysis["meta"]["total time (s)"] = f"{time.perf_counter() - t0:.1f}"
    _print_summary(analysis, written)
    print(f"\nreport: {written['html']}\ndone in {time.perf_counter() - t0:.1f} s")
    sys.stdout.flush()
    return 0


def _print_summary(a: dict, written: dict) -> None:
    from .report.patterns import verdict_word

    print(f"hierfast demo: {a['meta']['data']}")
    print(f"held-out accuracy: {a['accuracy']:.3f}\n")
    print("CKA between layers of the trained network (held-out data):")
    print(format_matrix(a["cka"].tolist(), a["layers"], a["layers"]))
    cols = ["layer"]
    rows = [list(a["layers"])]
    if "cka_vs_reference" in a:
        cols.append("vs init")
        rows.append([f"{v:.3f}" for v in torch.as_tensor(a["cka_vs_reference"]).diagonal().tolist()])
    for key, label in (("accuracy", "probe acc"), ("selectivity", "selectivity")):
        if key in a.get("probe", {}):
            cols.append(label)
            rows.append([f"{v:.3f}" for v in torch.as_tensor(a["probe"][key]).tolist()])
    if "translate" in a.get("invariance", {}):
        inv = a["invariance"]["translate"]
        cols.append(f"NIS shift {inv['magnitudes'][0]:g}")
        rows.append([f"{v:.3f}" for v in torch.as_tensor(inv["score"])[0].tolist()])
    if "twonn" in a.get("dimension", {}):
        cols.append("TwoNN dim")
        rows.append([f"{v:.1f}" for v in torch.as_tensor(a["dimension"]["twonn"]).tolist()])
    if "sparsity" in a:
        cols.append("active")
        rows.append([f"{v:.2f}" for v in torch.as_tensor(a["sparsity"]).tolist()])
    print("\nper layer:")
    widths = [max(len(c), *(len(str(v)) for v in r)) + 2 for c, r in zip(cols, rows)]
    print("".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for i in range(len(a["layers"])):
        print("".join(f"{r[i]:>{w}}" for r, w in zip(rows, widths)))
    print("\nwhat the hierarchy shows:")
    for p in written["patterns"]:
        verdict = verdict_word(p)  # the HTML's words ("undefined" when NaN left nothing to decide on)
        print(f"  [{verdict}] {p['statement']} ({p['evidence']})")
