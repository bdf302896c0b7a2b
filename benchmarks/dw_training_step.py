"""Training step of one depthwise layer (stride 1 and 2, 3x3 and 5x5): eager conv + activation vs
hierfast's Conv2dAct with the fused depthwise backward, and with it switched off (the unfused
backward), interleaved.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000 \\
        python benchmarks/dw_training_step.py [--bf16]

(the glibc settings keep freed memory, so no provider page-faults its fresh tensors each step;
see BENCHMARKS.md "Fused depthwise backward").
"""
import statistics
import time

import torch
from torch import nn

import hierfast.ops.conv_act as ops
from hierfast.nn import Conv2dAct

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def main(steps: int = 40, dtype: torch.dtype = torch.float32) -> None:
    torch.set_num_threads(2)
    # channels, input size, filter, stride: MobileNetV2's stride-1 and stride-2 (downsampling)
    # depthwise layers, and an EfficientNet 5x5
    for c, h, ksize, stride in [(32, 112, 3, 1), (144, 56, 3, 1), (96, 112, 3, 2), (144, 56, 3, 2), (240, 28, 5, 1)]:
        for act in ACTS:
            torch.manual_seed(0)
            conv = nn.Conv2d(c, c, ksize, stride, ksize // 2, groups=c).to(dtype)
            eager = nn.Sequential(conv, ACTS[act]())
            fused = Conv2dAct.from_conv(conv, act)
            x = torch.randn(8, c, h, h, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
            oh = (h + 2 * (ksize // 2) - ksize) // stride + 1
            gy = torch.randn(8, c, oh, oh, dtype=dtype).contiguous(memory_format=torch.channels_last)

            def step(m):
                def f():
                    for p in m.parameters():
                        p.grad = None
                    x.grad = None
                    m(x).backward(gy)
                return f

            real = ops._depthwise_fusable

            def unfused():
                ops._depthwise_fusable = lambda *a: False
                try:
                    step(fused)()
                finally:
                    ops._depthwise_fusable = real

            fns = {"eager": step(eager), "hierfast": step(fused), "hierfast-unfused-bwd": unfused}
            times = {k: [] for k in fns}
            for _ in range(3):
                for f in fns.values():
                    f()
            for _ in range(steps):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{str(dtype)[6:]} dw{ksize}x{ksize}/{stride} {c}@{h} {act}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in med.items())
                  + f" | hierfast vs eager {med['eager'] / med['hierfast']:.2f}x,"
                  f" fused vs unfused backward {med['hierfast-unfused-bwd'] / med['hierfast']:.2f}x")


if __name__ == "__main__":
    import sys

    main(dtype=torch.bfloat16 if "--bf16" in sys.argv[1:] else torch.float32)
