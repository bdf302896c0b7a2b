"""The fused CPU depthwise forward (csrc/cpu/dw_conv_forward.cpp) against what conv2d_act would
run without it, interleaved, fp32 channels_last, 2 threads: the measurements behind
hierfast.ops.conv_act._depthwise_forward_wins.

* inference: ours against oneDNN's fused post-op convolution (Mish: against torch's
  convolution + our epilogue pass, as oneDNN has no Mish post-op);
* training a smooth activation (the pre-activation z is saved for backward): ours, writing y and
  z in one pass, against oneDNN's convolution and then our epilogue (z -> y);
* statistics tap: ours against oneDNN's fused convolution and then a read-only statistics pass
  (Mish: torch's convolution + our epilogue with the tap).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000 \\
        python benchmarks/dw_forward.py [activation ...]

Speed-ups above 1 mean ours is faster. This shared 2-core VM varies by +-30 % between runs;
compare the speed-up columns, which pair the two providers call by call.
"""
import sys

import torch

from bench_conv import _interleaved
from hierfast.ops import activations as A
from hierfast.ops import conv_act as ops

# N, C, H, k, stride: MobileNet/EfficientNet depthwise layers
SHAPES = [(8, 32, 112, 3, 1), (8, 144, 56, 3, 1), (8, 96, 112, 3, 2), (1, 32, 112, 3, 1), (8, 576, 14, 3, 1),
          (8, 240, 28, 5, 1)]


def _providers(x, w, b, p: ops.ConvArgs, act, mode):
    stats = torch.zeros(x.shape[1], 3, dtype=torch.float64) if mode == "tap" else None
    keep = mode == "train"
    ours = {"ours": lambda: ops._depthwise_forward_cpu(x, w, b, p, act, keep, stats)}
    if A.onednn_attr(act) is None:
        def other():
            return ops._epilogue_forward(x, w, b, p, act, keep, stats, ops._cpu_epilogue(act))
    elif mode == "tap":
        def other():  # oneDNN's fused convolution, then a read-only statistics pass
            y = ops._onednn(x, w, b, p, act, reuse_weight=True)
            ops._cpu_stats(y, stats)
            return y
    elif mode == "train" and not act.grad_from_output:
        def other():  # what _fwd_cpu runs without the fused kernel
            z = ops._onednn(x, w, b, p, A.resolve("identity"))
            y = torch.empty_like(z)
            ops._cpu_epilogue(act)(z, y, z.shape[0], z.shape[1], z.shape[2] * z.shape[3], True, None, None)
            return y, z
    else:
        def other():  # inference: _fwd_cpu reuses oneDNN's blocked weight
            return ops._onednn(x, w, b, p, act, reuse_weight=True)
    return {**ours, "other": other}


def main(names, rounds: int = 40) -> None:
    torch.set_num_threads(2)
    print("| layer (N, C, H, k, stride) | activation | mode | ours | alternative | speed-up |")
    print("|---|---|---|---|---|---|")
    for n, c, h, k, s in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, h).to(memory_format=torch.channels_last)
        w, b = torch.randn(c, 1, k, k) / k, torch.randn(c)
        p = ops.ConvArgs((s, s), (k // 2, k // 2), (1, 1), c)
        for name in names:
            act = A.resolve(name)
            for mode in ("infer", "train", "tap"):
                if mode == "train" and act.grad_from_output:
                    continue  # saves y only: the same call as inference
                fns = _providers(x, w, b, p, act, mode)
                with torch.no_grad():
                    res = _interleaved(fns, budget_s=1.0, min_repeats=rounds, max_repeats=rounds)
                med = {key: r["median"] * 1e3 for key, r in res.items()}
                alt = {"infer": "oneDNN post-op", "train": "oneDNN conv + our epilogue",
                       "tap": "oneDNN post-op + stats pass"}[mode]
                if A.onednn_attr(act) is None and mode != "tap":
                    alt = "conv + epilogue"
                print(f"| {n}, {c}, {h}, {k}x{k}, {s} | {name} | {mode} | {med['ours']:.3f} ms | "
                      f"{med['other']:.3f} ms ({alt}) | {med['other'] / med['ours']:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["relu", "gelu", "silu", "hardswish", "mish"])
