"""Fused conv + activation (hierfast.nn.Conv2dAct) against eager conv + activation and
torch.compile, on the layers of the issue "Fused conv-activation layers: hierfast.nn".

Layers: ResNet-50 stem (7x7/2, 3->64, 224^2), 3x3 convs 64/128/256 ch at 56/28/14,
MobileNet depthwise 3x3 (32 ch at 112, 144 ch at 56), 1x1 pointwise 64->256 at 56.
N = 8 on CPU (32 on GPU), fp32 channels_last on CPU (bf16 on GPU); ReLU and GELU;
forward (inference, no_grad) and forward+backward (input grad except for the stem,
weight and bias grads). Every provider's output (forward) or weight gradient
(forward+backward) is compared with a float64 evaluation of the same layer.

Providers: eager conv + activation, hierfast Conv2dAct (as it runs by default; on the CPU forward
rows also inside ``hierfast.nn.frozen_weights()``, the opt-in block that keeps oneDNN's blocked
weight between calls), torch.compile (default), on a GPU
also torch.compile(mode="max-autotune") (HIERFAST_CONV_MAX_AUTOTUNE=0 leaves it out) and
each hierfast GPU backend forced ("hierfast backend=cuda": cuDNN + our epilogue kernel;
"hierfast backend=triton": our Triton kernels) where the automatic choice is another one,
and for ReLU forward rows torch's own fused cuDNN conv + bias + ReLU
(``torch.cudnn_convolution_relu``, inference only): the data for the registry's per-shape
choice; and torch's conv with no activation as the fusion bound.

Run: ``python benchmarks/run.py conv [--quick]``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import time

# Inductor's parallel compile workers keep running after a compile and steal CPU from
# whatever is timed next on this 2-core machine: compile in-process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import row  # noqa: E402
from hierfast.nn import frozen_weights  # noqa: E402

# name, C_in, C_out, k, stride, padding, groups, H (=W)
LAYERS = [
    ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 1, 224),
    ("3x3 64 @56", 64, 64, 3, 1, 1, 1, 56),
    ("3x3 128 @28", 128, 128, 3, 1, 1, 1, 28),
    ("3x3 256 @14", 256, 256, 3, 1, 1, 1, 14),
    ("dw3x3 32 @112", 32, 32, 3, 1, 1, 32, 112),
    ("dw3x3 144 @56", 144, 144, 3, 1, 1, 144, 56),
    ("1x1 64->256 @56", 64, 256, 1, 1, 0, 1, 56),
]
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}
TARGET_13 = ("stem", "dw3x3")  # layers with the >= 1.3x CPU target
# torch's convolution with no activation (forward, or its training step): a fused layer that
# runs torch's convolution cannot be faster, so eager / this is the most that fusing the
# activation can give. (hierfast's fused depthwise backward replaces torch's convolution
# backward, so its training step can beat this row.)
BOUND = "conv alone (fusion bound)"
FROZEN = "hierfast frozen_weights"


def _interleaved(fns: dict, *, budget_s: float, min_repeats: int, max_repeats: int, device=None) -> dict:
    """Time several providers round-robin (one call each per round, after one warm-up
    each), so background load on a shared machine hits all of them alike; the result
    per provider has the keys of ``_common.bench``."""
    import statistics

    from _common import sync

    results, times = {}, {k: [] for k in fns}
    t0 = time.perf_counter()
    for k, f in fns.items():
        results[k] = f()
    sync(device)
    warm = (time.perf_counter() - t0) / len(fns)
    reps = max(min_repeats, min(max_repeats, int(budget_s / max(warm, 1e-6))))
    for _ in range(reps):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            results[k] = f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": reps, "times": v,
                "warmup": warm, "result": results[k]} for k, v in times.items()}


def _flops(layer, n):
    _, cin, cout, k, s, p, g, h = layer
    oh = (h + 2 * p - k) // s + 1
    return 2 * n * oh * oh * cout * (cin // g) * k * k


def _min_bytes(layer, n, dtype, mode):
    """Least memory traffic of the layer (bytes): forward reads x and w and writes y; a training
    step also reads grad_y, x, w and y (the activation's gradient) and writes grad_x and grad_w."""
    _, cin, cout, k, s, p, g, h = layer
    oh = (h + 2 * p - k) // s + 1
    x, y, w = n * cin * h * h, n * cout * oh * oh, cout * (cin // g) * k * k
    elems = x + w + y if mode == "fwd" else (x + w + y) + (y + x + w + y) + (x + w)
    return elems * torch.tensor([], dtype=dtype).element_size()


def _rel_dev(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _models(layer, act, device, dtype):
    from hierfast.nn import Conv2dAct

    _, cin, cout, k, s, p, g, _ = layer
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, groups=g).to(device, dtype)
    eager = nn.Sequential(conv, ACTS[act]())
    fused = Conv2dAct.from_conv(conv, act)
    ref = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=g), ACTS[act]()).double().to(device)
    ref.load_state_dict(eager.state_dict())
    return eager, fused, ref


CUDNN_RELU = "torch cudnn_convolution_relu"


class _CudnnConvRelu(nn.Module):
    """``torch.cudnn_convolution_relu``: cuDNN's fused convolution + bias + ReLU (GPU inference)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return torch.cudnn_convolution_relu(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


class _ForcedBackend(nn.Module):
    """A Conv2dAct run on one named backend (``conv2d_act(..., backend=...)``)."""

    def __init__(self, fused, backend: str):
        super().__init__()
        self.fused, self.backend = fused, backend

    @property
    def weight(self):
        return self.fused.weight

    def forward(self, x):
        from hierfast.functional import conv2d_act

        f = self.fused
        return conv2d_act(x, f.weight, f.bias, f.stride, f.padding, f.dilation, f.groups, f.activation,
                          backend=self.backend)


def _gpu_backends_to_force(fused, x) -> list[str]:
    """The GPU backends the automatic choice does not take for this layer (each gets a row)."""
    from hierfast.backends import backend_status
    from hierfast.ops.conv_act import FORWARD

    auto = FORWARD.select((x, fused.weight) + ((fused.bias,) if fused.bias is not None else ())).backend
    return [b for b in ("cuda", "triton") if b != auto and backend_status(b)["available"]]


def _step(model, x, gy):
    def run():
        for prm in model.parameters():
            prm.grad = None
        model(x).backward(gy)
        if x.grad is not None:
            x.grad = None
        return model[0].weight.grad if isinstance(model, nn.Sequential) else model.weight.grad
    return run


def run(quick: bool = False) -> list[dict]:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = (8 if cuda else 2) if quick else (32 if cuda else 8)
    budget = 0.5 if quick else 2.5
    kw = dict(budget_s=budget, min_repeats=2 if quick else 5, max_repeats=5 if quick else 25, device=device)
    layers = LAYERS[:1] + LAYERS[4:5] if quick else LAYERS
    only = os.environ.get("HIERFAST_CONV_LAYERS")  # e.g. "dw3x3": the layers whose name contains it
    if only:
        layers = [layer for layer in layers if only in layer[0]]
    rows = []
    for layer in layers:
        name = layer[0]
        for act in ACTS:
            eager, fused, ref = _models(layer, act, device, dtype)
            torch.manual_seed(1)
            x = torch.randn(n, layer[1], layer[7], layer[7], device=device, dtype=dtype)
            x = x.to(memory_format=torch.channels_last)
            with torch.no_grad():
                y_ref = ref(x.double())
            gy = torch.randn_like(y_ref).to(dtype).contiguous(memory_format=torch.channels_last)
            # float64 weight gradient for the fwd+bwd accuracy column
            xr = x.double().requires_grad_(not name.startswith("stem"))
            ref(xr).backward(gy.double())
            gw_ref = ref[0].weight.grad
            torch._dynamo.reset()  # fresh cache per layer: never hit the recompile limit (-> silent eager)
            t0 = time.perf_counter()
            compiled = torch.compile(eager)
            with torch.no_grad():
                compiled(x)
            compile_fwd_s = time.perf_counter() - t0
            xg = x.detach().requires_grad_(not name.startswith("stem"))
            _compiled_step(compiled, eager, xg, gy)()  # compile the training graph before any timing
            compiled_ma = None
            if cuda and _max_autotune():
                # Inductor's autotuned templates (the GPU provider); compiles both graphs
                # before timing, like the default mode. Minutes per layer: see _max_autotune.
                t0 = time.perf_counter()
                compiled_ma = torch.compile(eager, mode="max-autotune")
                with torch.no_grad():
                    compiled_ma(x)
                _compiled_step(compiled_ma, eager, xg, gy)()
                compile_ma_s = time.perf_counter() - t0
            forced = [(f"hierfast backend={b}", _ForcedBackend(fused, b)) for b in _gpu_backends_to_force(fused, x)] \
                if cuda else []
            # torch's own fused cuDNN conv + bias + ReLU (inference only, no autograd): the GPU
            # counterpart of oneDNN's post-op path, a candidate for the per-shape choice
            cudnn_relu = [(CUDNN_RELU, _CudnnConvRelu(eager[0]))] if cuda and act == "relu" else []
            if cudnn_relu:
                try:  # not every build and dtype has it: leave it out rather than lose the layer
                    with torch.no_grad():
                        cudnn_relu[0][1](x)
                except RuntimeError as exc:
                    print(f"bench_conv: {CUDNN_RELU} left out for {name}: {exc}".splitlines()[0])
                    cudnn_relu = []
            time.sleep(1.0)
            for mode in ("fwd", "fwd+bwd"):
                wl = f"{name} {act} {mode} (N={n})"
                flops = _flops(layer, n) * (1 if mode == "fwd" else 3)
                # CPU inference inside hierfast.nn.frozen_weights() (opt-in: oneDNN's blocked weight
                # kept between calls), beside the default path that the targets are judged on
                frozen = [(FROZEN, fused)] if not cuda and mode == "fwd" else []
                provs = (("eager conv+act", eager), ("hierfast Conv2dAct", fused), *frozen, *forced,
                         *(cudnn_relu if mode == "fwd" else ()),
                         ("torch.compile", compiled),
                         *((("torch.compile max-autotune", compiled_ma),) if compiled_ma is not None else ()),
                         (BOUND, nn.Sequential(eager[0])))
                if mode == "fwd":
                    fns = {p: (lambda m=m: m(x)) for p, m in provs}
                else:
                    xi = x.detach().requires_grad_(not name.startswith("stem"))
                    fns = {p: (_compiled_step(m, eager, xi, gy) if p.startswith("torch.compile") else _step(m, xi, gy))
                           for p, m in provs}
                if frozen:  # one block around the timing, so its copies persist; the default
                    default = contextvars.copy_context()  # path runs in a context from outside it
                    fns["hierfast Conv2dAct"] = lambda: default.run(fused, x)
                with torch.set_grad_enabled(mode != "fwd"), (frozen_weights() if frozen else contextlib.nullcontext()):
                    results = _interleaved(fns, **kw)
                for prov, _ in provs:
                    t = results[prov]
                    if prov == BOUND:  # computes another function: no accuracy column
                        dev, note = math.nan, "bound: no activation at all"
                    else:
                        dev = _rel_dev(t["result"], y_ref if mode == "fwd" else gw_ref)
                        note = ""
                        if mode == "fwd" and prov == "torch.compile":
                            note = f"compile {compile_fwd_s:.0f} s (fwd, first call)"
                        elif mode == "fwd" and prov == "torch.compile max-autotune":
                            note = f"compile {compile_ma_s:.0f} s (fwd + bwd graphs)"
                    rows.append(row(wl, prov, t, max_dev=dev, note=note, layer=name, act=act, mode=mode,
                                    gflops=flops / t["median"] / 1e9, flops=flops, dtype=str(dtype), device=device,
                                    bytes=_min_bytes(layer, n, dtype, mode)))
                base = results["eager conv+act"]["median"]
                for r in rows[-len(provs):]:
                    r["ratio"] = base / r["time_s"]
    return rows


def _max_autotune() -> bool:
    """Time ``torch.compile(mode="max-autotune")`` too (GPU only, as the issue asks). On by
    default; ``HIERFAST_CONV_MAX_AUTOTUNE=0`` leaves it out (its autotuning takes minutes per
    layer, more than a short GPU lease holds)."""
    return os.environ.get("HIERFAST_CONV_MAX_AUTOTUNE", "1") not in ("", "0")


def _compiled_step(compiled, eager, x, gy):
    def run():
        for prm in eager.parameters():
            prm.grad = None
        compiled(x).backward(gy)
        if x.grad is not None:
            x.grad = None
        return eager[0].weight.grad
    return run


def _deviation_line(hf_rows) -> list[str]:
    """The largest relative deviation from float64 of hierfast's rows, as a summary line (none
    when no row has one)."""
    devs = [r["max_dev"] for r in hf_rows if math.isfinite(r["max_dev"])]
    return [f"hierfast max relative deviation from float64: {max(devs):.1e}"] if devs else []


def summary(rows) -> list[str]:
    """Target checks (CPU: >= 1.0x eager on every layer, >= 1.3x on stem and depthwise; GPU: see
    :func:`gpu_summary`)."""
    out = []
    hf = [r for r in rows if r["provider"] == "hierfast Conv2dAct"]
    if not hf:
        return out
    if hf[0].get("device") == "cuda":
        return gpu_summary(rows)
    worst = min(hf, key=lambda r: r["ratio"])
    below = [r for r in hf if not r["ratio"] >= 1.0]
    out.append(f"target >= 1.0x eager on every layer/activation/mode: {'MET' if not below else 'MISSED'} "
               f"({len(hf) - len(below)}/{len(hf)}; worst {worst['ratio']:.2f}x: {worst['workload']})")
    bound = {r["workload"]: r["ratio"] for r in rows if r["provider"] == BOUND}
    big = [r for r in hf if r["layer"].startswith(TARGET_13)]
    miss = [r for r in big if not r["ratio"] >= 1.3]
    out.append(f"target >= 1.3x eager on stem and depthwise: {'MET' if not miss else 'MISSED'} "
               f"({len(big) - len(miss)}/{len(big)}"
               + ("; missed: " + ", ".join(f"{r['workload']} {r['ratio']:.2f}x (bound {bound.get(r['workload'], math.nan):.2f}x)"
                                          for r in miss) if miss else "")
               + ")")
    unreachable = [r for r in miss if bound.get(r["workload"], math.inf) < 1.3]
    if unreachable:
        out.append(f"of those, {len(unreachable)} have a fusion bound (eager / torch's conv alone) below 1.3x: only a "
                   "faster convolution than torch's could meet the target there")
    share = [r["ratio"] / bound[r["workload"]] for r in hf if bound.get(r["workload"], 0) > 0]
    if share:
        out.append(f"hierfast time / conv-alone time: {1 / max(share):.2f}-{1 / min(share):.2f} "
                   "(1.00: the activation costs nothing; below 1: faster than torch's convolution alone)")
    for prov in ("torch.compile", "torch.compile max-autotune"):
        comp = {r["workload"]: r for r in rows if r["provider"] == prov}
        if comp:
            wins = sum(h["time_s"] <= comp[h["workload"]]["time_s"] for h in hf if h["workload"] in comp)
            mode = "default" if prov == "torch.compile" else "max-autotune"
            out.append(f"hierfast faster than torch.compile ({mode}) on {wins}/{len(comp)} rows")
    out += _deviation_line(hf)
    return out


def _memory_bound(r, peaks) -> bool:
    """The row's arithmetic intensity (FLOPs per byte of its minimal traffic) is below the
    device's balance point (peak FLOP/s over bandwidth, for the row's dtype)."""
    peak = peaks.get(str(r.get("dtype"))) if peaks else None
    return bool(peak) and r["flops"] / r["bytes"] < peak / peaks["bandwidth"]


def gpu_summary(rows, device_name: str | None = None) -> list[str]:
    """The issue's GPU targets (bf16): hierfast >= torch.compile default on every layer, >= 1.2x
    eager on the memory-bound layers (by arithmetic intensity against the device's balance
    point); and, per row, the forced backends against the automatic choice: the data for the
    registry's per-shape choice."""
    from _common import device_peaks

    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peaks = device_peaks(device_name)
    out = []
    hf = {r["workload"]: r for r in rows if r["provider"] == "hierfast Conv2dAct"}
    comp = {r["workload"]: r for r in rows if r["provider"] == "torch.compile"}
    common = [w for w in hf if w in comp]
    if common:
        slower = [w for w in common if not hf[w]["time_s"] <= comp[w]["time_s"]]
        out.append(f"GPU target >= torch.compile (default) on every row: {'MET' if not slower else 'MISSED'} "
                   f"({len(common) - len(slower)}/{len(common)}"
                   + ("; slower: " + ", ".join(f"{w} {comp[w]['time_s'] / hf[w]['time_s']:.2f}x" for w in slower)
                      if slower else "") + ")")
    if peaks:
        mem = [r for r in hf.values() if _memory_bound(r, peaks)]
        miss = [r for r in mem if not r["ratio"] >= 1.2]
        out.append(f"GPU target >= 1.2x eager on the memory-bound rows (intensity < "
                   f"{peaks[str(next(iter(hf.values()))['dtype'])] / peaks['bandwidth']:.0f} FLOP/B on "
                   f"{device_name}): {'MET' if not miss else 'MISSED'} ({len(mem) - len(miss)}/{len(mem)}"
                   + ("; missed: " + ", ".join(f"{r['workload']} {r['ratio']:.2f}x" for r in miss) if miss else "")
                   + ")")
    else:
        out.append(f"GPU memory-bound target: no peak figures for '{device_name}' in _common.DEVICE_PEAKS")
    forced = [r for r in rows if r["provider"].startswith("hierfast backend=") or r["provider"] == CUDNN_RELU]
    for r in forced:
        auto = hf.get(r["workload"])
        if auto:
            what = r["provider"].split("=", 1)[1] if "=" in r["provider"] else r["provider"]
            out.append(f"backend choice: {r['workload']}: {what} "
                       f"{auto['time_s'] / r['time_s']:.2f}x the automatic choice's speed")
    out += _deviation_line(hf.values())
    return out
