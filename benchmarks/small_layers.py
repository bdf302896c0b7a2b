"""Small layers, where per-call costs show, and the CPU path choices of hierfast.ops.conv_act:

    python benchmarks/small_layers.py calls [activation]
    python benchmarks/small_layers.py paths [activation]
    python benchmarks/small_layers.py steps [activation] [n8]
    python benchmarks/small_layers.py train [activation]

``calls``: ``Conv2dAct`` against eager ``nn.Conv2d`` + activation, microseconds per call, N = 1,
inference and training forward, the minimum over 7 rounds of back-to-back calls (the per-call
floor, not this VM's noise).
``paths``: inference on channels_last input, oneDNN's post-op convolution with its blocked weight
kept against torch's convolution + our epilogue, over 3x3 and 1x1 layers of 16-512 channels at
4-28 px, N = 1 (the limits of ``_onednn_pays``); "epilogue / oneDNN" above 1: oneDNN is faster.
``steps``: whole training steps (forward + backward), eager against Conv2dAct through the fused
op (at every size: small layers otherwise train on torch's own ops, ``eager_training_pays``)
with its forward forced onto oneDNN (weight reordered per call) or onto torch's convolution + our
epilogue, interleaved; N = 1 layers, or with ``n8`` the N = 8 layers of bench_conv. The reason
training never takes oneDNN (``_fwd_cpu``).
``train``: whole training steps by layer size: eager, the fused op, and Conv2dAct as it runs (torch's
own ops below ``eager_training_pays`` outputs). 2 threads.
"""
import contextlib
import sys
import time

import torch
from torch import nn

from bench_conv import _interleaved
from bench_conv import _step as bench_step
from hierfast.nn import Conv2dAct
from hierfast.ops import activations as A
from hierfast.ops import conv_act as ops


def per_call_us(fn, calls: int = 0) -> float:
    """Minimum over 7 rounds of the mean time of one call (us); ``calls`` per round (0: ~50 ms)."""
    for _ in range(20):
        fn()
    if not calls:
        t = time.perf_counter()
        fn()
        calls = max(20, int(0.05 / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def calls_table(act: str) -> None:
    print(f"| layer (N = 1), {act} | mode | eager conv + act | hierfast Conv2dAct | ratio |")
    print("|---|---|---|---|---|")
    for c, hw, channels_last in [(16, 4, False), (16, 4, True), (64, 8, True), (128, 14, True)]:
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, 3, padding=1)
        x = torch.randn(1, c, hw, hw)
        if channels_last:
            conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        eager = nn.Sequential(conv, nn.ReLU() if act == "relu" else nn.GELU())
        fused = Conv2dAct.from_conv(conv, act)
        xg = x.clone().requires_grad_()
        layout = "channels_last" if channels_last else "NCHW"
        for mode in ("inference", "training forward"):
            if mode == "inference":
                with torch.no_grad():
                    e, f = per_call_us(lambda: eager(x), 3000), per_call_us(lambda: fused(x), 3000)
            else:
                e, f = per_call_us(lambda: eager(xg), 1000), per_call_us(lambda: fused(xg), 1000)
            print(f"| 3x3 {c} @{hw}, {layout} | {mode} | {e:.1f} us | {f:.1f} us | {e / f:.2f}x |")


def paths_table(act_name: str) -> None:
    act = A.resolve(act_name)
    run = ops._cpu_epilogue(act)
    print(f"| layer (N = 1), {act_name}, inference | outputs | multiply-adds | oneDNN, kept weight | "
          "conv + epilogue | epilogue / oneDNN | rule picks |")
    print("|---|---|---|---|---|---|---|")
    for k in (3, 1):
        for c in (16, 32, 64, 128, 256, 512):
            for hw in (4, 7, 8, 14, 16, 28):
                torch.manual_seed(0)
                x = torch.randn(1, c, hw, hw).to(memory_format=torch.channels_last)
                w = (torch.randn(c, c, k, k) * 0.05).to(memory_format=torch.channels_last)
                b = torch.randn(c)
                p = ops.ConvArgs((1, 1), (k // 2, k // 2), (1, 1), 1)
                with torch.no_grad():
                    a = per_call_us(lambda: ops._onednn(x, w, b, p, act, reuse_weight=True))
                    e = per_call_us(lambda: ops._epilogue_forward(x, w, b, p, act, False, None, run))
                pick = "oneDNN" if ops._onednn_pays(x, w, p, True) else "epilogue"
                outputs = c * hw * hw
                macs = outputs * c * k * k
                print(f"| {k}x{k} {c} @{hw} | {outputs} | {macs / 1e6:.2f} M | {a:.1f} us | {e:.1f} us | {e / a:.2f} | "
                      f"{pick} |")


@contextlib.contextmanager
def _fused_at_every_size():
    """Conv2dAct trains through the fused op whatever the layer's size (ops.eager_training_pays)."""
    limits = ops._EAGER_TRAIN_MAX_OUTPUT_FROM_Y, ops._EAGER_TRAIN_MAX_OUTPUT_SMOOTH
    ops._EAGER_TRAIN_MAX_OUTPUT_FROM_Y = ops._EAGER_TRAIN_MAX_OUTPUT_SMOOTH = 0
    try:
        yield
    finally:
        ops._EAGER_TRAIN_MAX_OUTPUT_FROM_Y, ops._EAGER_TRAIN_MAX_OUTPUT_SMOOTH = limits


def _step(model, x, gy, force=None):
    """One training step of ``model``; ``force`` ("onednn" / "epilogue") makes Conv2dAct's forward
    take that path by calling the CPU backend's pieces directly (what _fwd_cpu ran before 2026-12-02
    on the oneDNN side: y in one primitive for ReLU, z then our epilogue for a smooth activation)."""
    run = bench_step(model, x, gy)
    if force is None:
        return run

    def forced():
        real = ops._fwd_cpu

        def fwd(x_, w, b, p, act, keep, stats):
            if not (keep and force == "onednn"):
                return real(x_, w, b, p, act, keep, stats)
            if act.grad_from_output:
                y = ops._onednn(x_, w, b, p, act)
                return y, y
            z = ops._onednn(x_, w, b, p, A.resolve("identity"))
            y = torch.empty_like(z)
            ops._cpu_epilogue(act)(z, y, z.shape[0], z.shape[1], z.shape[2] * z.shape[3], True, None, None)
            return y, z
        impl = ops.FORWARD.impls["cpu"]
        impl.fn = fwd
        try:
            with _fused_at_every_size():  # (small layers otherwise train on torch's ops)
                run()
        finally:
            impl.fn = real
    return forced


def steps_table(act: str, n8: bool) -> None:
    layers = ([("stem",), (3, 64, 56, 8), (3, 128, 28, 8), (3, 256, 14, 8), (1, 64, 56, 8)] if n8 else
              [(3, 64, 14, 1), (3, 128, 7, 1), (3, 256, 7, 1), (3, 512, 4, 1), (3, 64, 28, 1), (3, 128, 14, 1),
               (3, 64, 56, 1), (3, 256, 14, 1), (1, 64, 16, 1), (1, 256, 7, 1), (1, 256, 14, 1), (1, 512, 7, 1)])
    print(f"| layer, {act}, training step | eager | oneDNN forward | conv + epilogue forward | epilogue / oneDNN |")
    print("|---|---|---|---|---|")
    for layer in layers:
        torch.manual_seed(0)
        if layer[0] == "stem":  # ResNet-50 stem, no input gradient (as bench_conv)
            name, n = "stem 7x7/2 3->64 @224", 8
            conv = nn.Conv2d(3, 64, 7, 2, 3)
            x, gy = torch.randn(n, 3, 224, 224), torch.randn(n, 64, 112, 112)
        else:
            k, c, hw, n = layer
            cout = 256 if (k == 1 and hw == 56) else c
            name = f"{k}x{k} {c}->{cout} @{hw} N={n}" if cout != c else f"{k}x{k} {c} @{hw} N={n}"
            conv = nn.Conv2d(c, cout, k, padding=k // 2)
            x, gy = torch.randn(n, c, hw, hw).requires_grad_(), torch.randn(n, cout, hw, hw)
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(x.requires_grad)
        gy = gy.to(memory_format=torch.channels_last)
        eager = nn.Sequential(conv, nn.ReLU() if act == "relu" else nn.GELU())
        fused = Conv2dAct.from_conv(conv, act)
        r = _interleaved({"eager": _step(eager, x, gy), "onednn": _step(fused, x, gy, "onednn"),
                          "epilogue": _step(fused, x, gy, "epilogue")}, budget_s=2.5, min_repeats=30, max_repeats=200)
        e, o, p = (r[q]["median"] * 1e6 for q in ("eager", "onednn", "epilogue"))
        print(f"| {name} | {e:.0f} us | {o:.0f} us | {p:.0f} us | {p / o:.2f} |", flush=True)


def train_table(act: str) -> None:
    """Whole training steps by layer size: eager, the fused op at every size, and Conv2dAct as it
    runs (torch's own ops below the size limits of ops.eager_training_pays): their measurements."""
    def fused_op(model, x, gy):
        run = _step(model, x, gy)

        def f():
            with _fused_at_every_size():
                run()
        return f

    print(f"| layer, {act}, training step | outputs | eager | fused op | Conv2dAct as it runs | eager / fused op |")
    print("|---|---|---|---|---|---|")
    layers = [(3, 64, 14, 1), (3, 64, 28, 1), (3, 64, 28, 2), (3, 64, 28, 4), (3, 64, 56, 1), (3, 64, 56, 2),
              (3, 128, 28, 2), (3, 256, 14, 4), (1, 64, 16, 1), (1, 64, 28, 2), (1, 256, 14, 2), (1, 64, 56, 2),
              (1, 128, 28, 8)]
    for k, c, hw, n in layers:
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, k, padding=k // 2).to(memory_format=torch.channels_last)
        x = torch.randn(n, c, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
        gy = torch.randn(n, c, hw, hw).to(memory_format=torch.channels_last)
        eager = nn.Sequential(conv, nn.ReLU() if act == "relu" else nn.GELU())
        fused = Conv2dAct.from_conv(conv, act)
        r = _interleaved({"eager": _step(eager, x, gy), "fused": fused_op(fused, x, gy), "auto": _step(fused, x, gy)},
                         budget_s=3, min_repeats=30, max_repeats=300)
        e, f, a = (r[q]["median"] * 1e6 for q in ("eager", "fused", "auto"))
        print(f"| {k}x{k} {c} @{hw} N={n} | {n * c * hw * hw} | {e:.0f} us | {f:.0f} us | {a:.0f} us | {e / f:.2f} |",
              flush=True)


def main() -> None:
    torch.set_num_threads(2)
    what = sys.argv[1] if len(sys.argv) > 1 else "calls"
    act = sys.argv[2] if len(sys.argv) > 2 else "relu"
    if what not in ("calls", "paths", "steps", "train"):
        raise SystemExit("usage: python benchmarks/small_layers.py calls|paths|steps|train [activation] [n8]; "
                         f"got {sys.argv[1:]}")
    if what == "calls":
        calls_table(act)
    elif what == "paths":
        paths_table(act)
    elif what == "train":
        train_table(act)
    else:
        steps_table(act, n8=len(sys.argv) > 3 and sys.argv[3] == "n8")


if __name__ == "__main__":
    main()
