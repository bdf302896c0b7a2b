"""Cost of the statistics tap (Conv2dAct(track_stats=True): per-channel sum, sum of squares
and positive count of the output, float64, inside the epilogue) against the same layer
without it and against the layer followed by the same statistics in torch (a second pass
over the output), interleaved, forward in inference, fp32 channels_last, N = 8, 2 threads.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000 \\
        python benchmarks/stats_tap.py

(the glibc settings keep freed memory, so no provider page-faults its fresh outputs each call).
"""
import torch

from bench_conv import _interleaved
from hierfast.nn import Conv2dAct

# name, C_in, C_out, k, stride, padding, groups, H (the layers of bench_conv.py)
LAYERS = [
    ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 1, 224),
    ("3x3 64 @56", 64, 64, 3, 1, 1, 1, 56),
    ("dw3x3 144 @56", 144, 144, 3, 1, 1, 144, 56),
    ("1x1 64->256 @56", 64, 256, 1, 1, 0, 1, 56),
]


def _torch_stats(y: torch.Tensor):
    yd = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    return yd.sum(1), (yd * yd).sum(1), (yd > 0).sum(1)


def main(rounds: int = 30) -> None:
    torch.set_num_threads(2)
    print("| layer | act | no tap | tap | tap / no tap | layer + torch stats | tap speed-up over it |")
    print("|---|---|---|---|---|---|---|")
    for name, cin, cout, k, s, p, g, h in LAYERS:
        for act in ("relu", "gelu"):
            torch.manual_seed(0)
            plain = Conv2dAct(cin, cout, k, s, p, groups=g, activation=act).to(memory_format=torch.channels_last)
            tapped = Conv2dAct(cin, cout, k, s, p, groups=g, activation=act, track_stats=True)
            tapped.load_state_dict(plain.state_dict())
            tapped = tapped.to(memory_format=torch.channels_last)
            x = torch.randn(8, cin, h, h).to(memory_format=torch.channels_last)
            fns = {"plain": lambda: plain(x), "tap": lambda: tapped(x),
                   "torch": lambda: _torch_stats(plain(x))}
            with torch.no_grad():
                res = _interleaved(fns, budget_s=1.5, min_repeats=rounds, max_repeats=rounds)
                # the tap must have counted what torch counts
                tapped.reset_stats()
                y = tapped(x)
                ref = _torch_stats(y)
                got = tapped.stats()
                count = y.numel() // y.shape[1]
                if not torch.allclose(got["mean"], ref[0] / count, rtol=1e-9, atol=1e-12):
                    raise RuntimeError(f"{name} {act}: the tap's means differ from torch's")
            med = {key: r["median"] * 1e3 for key, r in res.items()}
            print(f"| {name} | {act} | {med['plain']:.2f} ms | {med['tap']:.2f} ms | {med['tap'] / med['plain']:.2f} | "
                  f"{med['torch']:.2f} ms | {med['torch'] / med['tap']:.2f}x |")


if __name__ == "__main__":
    main()
