"""A/B of the rule that picks the CPU inference path when the weight is reordered on every call
(outside ``hierfast.nn.frozen_weights()``): oneDNN's post-op convolution or torch's convolution + our
epilogue (``hierfast.ops.conv_act._onednn_pays``). Fused ResNet-18 (frozen BN) against eager, each
rule swapped in per provider and timed interleaved in one run, at batch 1 and 8, 2 threads:

* ``size``: the size limits alone (>= 20 K outputs or >= 5 M multiply-adds), the rule before
  2026-12-02 (third session);
* ``never``: always torch's convolution + our epilogue;
* ``8x`` (the rule now) / ``32x``: the size limits and an output of >= 8 (32) x the weight's elements.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000 \\
        python benchmarks/inference_path_rule.py [nchw | layers]

``layers``: the same rules on bench_conv's non-depthwise layers one at a time (N = 8, ReLU,
channels_last), where the weight stays in cache between calls.
"""
import sys

import torch

from bench_conv import _interleaved
from bench_resnet_step import frozen_bn_resnet18
from hierfast.nn import fuse
from hierfast.ops import conv_act as ops


def _by_size(x, w, p, reuse):
    numel = ops._output_numel(x, w, p)
    macs = numel * w[0].numel()
    return numel >= ops._ONEDNN_MIN_OUTPUT or macs >= (ops._ONEDNN_MIN_MACS_KEPT if reuse else
                                                       ops._ONEDNN_MIN_MACS_REORDERED)


def _per_weight(factor):
    return lambda x, w, p, reuse: _by_size(x, w, p, reuse) and ops._output_numel(x, w, p) >= factor * w.numel()


RULES = {"size": _by_size, "never": lambda x, w, p, reuse: False, "8x": _per_weight(8), "32x": _per_weight(32)}


def _timed_rules(reference, fused, x) -> dict:
    """Median ms of ``reference(x)`` ("eager") and of ``fused(x)`` under each rule, interleaved."""
    def with_rule(rule):
        def run():
            ops._onednn_pays = rule
            return fused(x)
        return run

    with torch.no_grad():
        res = _interleaved({"eager": lambda: reference(x), **{k: with_rule(r) for k, r in RULES.items()}},
                           budget_s=4, min_repeats=10, max_repeats=40)
    return {k: r["median"] * 1e3 for k, r in res.items()}


def _layers() -> None:
    from torch import nn

    from bench_conv import LAYERS
    from hierfast.nn import Conv2dAct

    print("| layer (N = 8, ReLU) | eager | " + " | ".join(f"{k}: eager / fused" for k in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for name, cin, cout, k, s, pad, g, hw in LAYERS:
        if g > 1:  # depthwise layers take hierfast's own fused kernel, not this rule
            continue
        conv = nn.Conv2d(cin, cout, k, s, pad)
        fused = Conv2dAct(cin, cout, k, s, pad, activation="relu")
        fused.load_state_dict(conv.state_dict())
        eager = nn.Sequential(conv, nn.ReLU()).to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
        med = _timed_rules(eager, fused, torch.randn(8, cin, hw, hw).to(memory_format=torch.channels_last))
        print(f"| {name} | {med['eager']:.2f} ms | " + " | ".join(f"{med['eager'] / med[k]:.2f}x" for k in RULES)
              + " |", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    if "layers" in sys.argv[1:]:
        chosen = ops._onednn_pays
        try:
            return _layers()
        finally:
            ops._onednn_pays = chosen
    fmt = torch.contiguous_format if "nchw" in sys.argv[1:] else torch.channels_last
    model = frozen_bn_resnet18().eval().to(memory_format=fmt)
    fused, _ = fuse(model)
    chosen = ops._onednn_pays
    print("| batch, size, layout | eager | " + " | ".join(f"{k}: eager / fused" for k in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    try:
        for n, hw in [(1, 224), (1, 112), (8, 224)]:
            med = _timed_rules(model, fused, torch.randn(n, 3, hw, hw).to(memory_format=fmt))
            layout = "NCHW" if fmt == torch.contiguous_format else "channels_last"
            print(f"| {n}, {hw}, {layout} | {med['eager']:.2f} ms | "
                  + " | ".join(f"{med['eager'] / med[k]:.2f}x" for k in RULES) + " |", flush=True)
    finally:
        ops._onednn_pays = chosen


if __name__ == "__main__":
    main()
