"""Capture benchmark (issue "Capture engine", section Performance).

``hierfast.analyze(model, batches, stats=("cka",))`` — hooks on every conv/linear layer
(default selection), flattened features copied inside the hooks, finiteness check, and
debiased minibatch CKA of all layer pairs (L x L, one forward per batch) — against plain
inference of the same model on the same batches (``torch.inference_mode()``, no hooks).
Target: analyze <= 1.6x plain inference on the 2-core CPU (<= 1.3x on a GPU).

Workloads (float32, batch 128, random 3x32x32 inputs, seed 1234):
- the 8-conv CNN of the CKA benchmark (bench_cka.make_cnn(0)): 8 conv layers recorded;
- a ResNet-18-like CIFAR network written here (3x3 stem, no max-pool, [2, 2, 2, 2] basic
  blocks of widths 64-128-256-512, BatchNorm, ReLU(inplace=True), 1x1 projection shortcuts,
  global average pool, linear 512 -> 10): 21 layers recorded (20 convs + the linear).

Timing: the two are timed alternately (plain, analyze, plain, ...; see bench_pair) because
the machine may be shared; the overhead is the median of the per-pair time ratios.

Accuracy: analyze's matrix against a float64 reference of the same estimator computed from
features captured by plain hooks that clone (untimed, bench_cka.ref_step per batch).

Run: ``python benchmarks/run.py capture [--quick]``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import statistics  # noqa: E402
import time  # noqa: E402

from _common import row, sync  # noqa: E402
from bench_cka import INPUT_SEED, _ratio, deviation, make_cnn, ref_step  # noqa: E402

BATCH = 128
TARGET = 1.6


# --------------------------------------------------------------------------- ResNet-18-like
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu_(h + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016; the common CIFAR variant)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        h = torch.relu_(self.bn1(self.conv1(x)))
        h = self.layers(h)
        return self.fc(h.mean(dim=(2, 3)))


def make_resnet(seed: int = 0) -> ResNet18:
    torch.manual_seed(seed)
    return ResNet18().eval()


# --------------------------------------------------------------------------- timing
def bench_pair(fa, fb, *, budget_s: float, min_repeats: int, max_repeats: int):
    """Time ``fa`` and ``fb`` alternately (a, b, a, b, ...) after one warm-up call each.

    The machine is shared: load that changes during the run then hits both sides alike, and
    the median of the per-pair ratios b/a is robust to it (sequential blocks of repeats are
    not: one measured 2.5x for the same code that gave 1.3x in a quieter minute).
    Returns (timing of a, timing of b, median ratio b/a), timings as ``_common.bench``'s.
    """
    out = []
    for f in (fa, fb):
        sync()
        t0 = time.perf_counter()
        res = f()
        sync()
        out.append({"warmup": time.perf_counter() - t0, "result": res, "times": []})
    per_pair = out[0]["warmup"] + out[1]["warmup"]
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(per_pair, 1e-6))))
    for _ in range(repeats):
        for f, o in zip((fa, fb), out):
            sync()
            t0 = time.perf_counter()
            o["result"] = f()
            sync()
            o["times"].append(time.perf_counter() - t0)
    for o in out:
        o.update(median=statistics.median(o["times"]), min=min(o["times"]), max=max(o["times"]), repeats=repeats)
    ratio = statistics.median(b / a for a, b in zip(out[0]["times"], out[1]["times"]))
    return out[0], out[1], ratio


# --------------------------------------------------------------------------- providers
@torch.inference_mode()
def plain_inference(model, batches) -> None:
    for x in batches:
        model(x)


def hierfast_analyze(model, batches):
    from hierfast import analyze

    return analyze(model, batches, stats=("cka",), progress=False)


@torch.no_grad()
def reference(model, batches, names) -> torch.Tensor:
    """float64 minibatch CKA of features captured by hand-written cloning hooks."""
    store, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, a, o, n=n: store.__setitem__(n, o.reshape(o.shape[0], -1).clone())))
    ab = aa = bb = 0
    try:
        for x in batches:
            store.clear()
            model(x)
            feats = [store[n] for n in names]
            d_ab, d_aa, d_bb = ref_step(feats, feats)
            ab, aa, bb = ab + d_ab, aa + d_aa, bb + d_bb
    finally:
        for h in hooks:
            h.remove()
    return _ratio(ab, aa, bb)


def run(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    kw = dict(budget_s=2.0 if quick else 30.0, min_repeats=1 if quick else 5, max_repeats=5 if quick else 11)
    torch.manual_seed(INPUT_SEED)
    for label, model, n in [("8-conv CNN (bench_cka)", make_cnn(0), 256 if quick else 1024),
                            ("ResNet-18-like (CIFAR)", make_resnet(0), 128 if quick else 512)]:
        batches = [torch.randn(BATCH, 3, 32, 32) for _ in range(n // BATCH)]
        wl = f"{label}, {n // BATCH}×{BATCH} inputs 3×32×32"
        t_plain, t, over = bench_pair(lambda: plain_inference(model, batches),
                                      lambda: hierfast_analyze(model, batches), **kw)
        rows.append(row(wl, "plain inference (torch.inference_mode, no hooks)", t_plain, ratio=1.0, baseline=True,
                        note="baseline; timed alternately with the row below"))
        res = t["result"]
        ref = reference(model, batches, res.layers)
        dev, nan = deviation(res.cka, ref)
        d = sum(int(torch.tensor(s).prod()) for s in res.shapes.values())
        rows.append(row(wl, "hierfast.analyze(stats=('cka',))", t, ratio=t_plain["median"] / t["median"],
                        max_dev=dev, nan=nan, overhead=over, hierfast=True, workload_label=label,
                        note=f"{over:.2f}× plain inference (median of paired ratios); {len(res.layers)} layers ({res.layers[0]} … "
                             f"{res.layers[-1]}), flattened, Σd = {d}; {res.n_samples} samples"))
    return rows


def summary(rows) -> list[str]:
    out = [f"Target (issue \"Capture engine\"): analyze ≤ {TARGET}× plain inference (CPU), same run:"]
    for r in rows:
        if r.get("hierfast"):
            ok = "met" if r["overhead"] <= TARGET else "MISSED"
            out.append(f"  {r['workload_label']}: {r['overhead']:.2f}× ({r['time_s'] * 1e3:.0f} ms) — {ok}; "
                       f"max |dev| vs float64 {r['max_dev']:.1e}")
    return out


if __name__ == "__main__":
    import sys

    sys.exit(__import__("run").main(["capture"] + sys.argv[1:]))
