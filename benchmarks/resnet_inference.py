"""Inference of torchvision's ResNet-18 architecture (frozen BN, channels_last, float32): eager,
eager with torch's own Conv+BN folding, and hierfast's ``fuse`` (BN folded, Conv2dAct) as it runs by
default and inside ``hierfast.nn.frozen_weights()`` (oneDNN's blocked weights kept between calls),
interleaved, at batch 1 and 8, 224x224 and 112x112, 2 threads. Small batches are where per-call costs
show.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000 \\
        python benchmarks/resnet_inference.py
"""
import contextvars

import torch

from bench_conv import _interleaved
from bench_resnet_step import frozen_bn_resnet18, torch_folded
from hierfast.nn import frozen_weights, fuse


def main() -> None:
    torch.set_num_threads(2)
    model = frozen_bn_resnet18().eval().to(memory_format=torch.channels_last)
    folded = torch_folded(model).eval()
    fused, _ = fuse(model)
    print("| batch, size | eager | torch folding | hierfast fuse | fuse, frozen_weights | vs eager | frozen vs eager "
          "| vs torch folding | max abs dev |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, hw in [(1, 224), (8, 224), (1, 112), (8, 112)]:
        x = torch.randn(n, 3, hw, hw).to(memory_format=torch.channels_last)
        default = contextvars.copy_context()  # taken outside the block: runs the default path
        with torch.no_grad(), frozen_weights():  # one block for the whole run: its copies persist
            res = _interleaved({"eager": lambda: model(x), "folded": lambda: folded(x),
                                "fused": lambda: default.run(fused, x), "frozen": lambda: fused(x)},
                               budget_s=4, min_repeats=10, max_repeats=40)
            dev = max((fused(x) - model(x)).abs().max().item(), (default.run(fused, x) - model(x)).abs().max().item())
        med = {k: r["median"] * 1e3 for k, r in res.items()}
        print(f"| {n}, {hw} | {med['eager']:.2f} ms | {med['folded']:.2f} ms | {med['fused']:.2f} ms | "
              f"{med['frozen']:.2f} ms | {med['eager'] / med['fused']:.2f}x | {med['eager'] / med['frozen']:.2f}x | "
              f"{med['folded'] / med['fused']:.2f}x | {dev:.1e} |")


if __name__ == "__main__":
    main()
