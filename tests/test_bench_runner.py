"""The benchmark runner's table helpers (benchmarks/_common.py): roofline fraction and column."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as C  # noqa: E402


def _row(**kw):
    r = C.row("w", "p", {"median": 2e-3, "min": 1e-3, "max": 3e-3, "repeats": 5}, ratio=1.0, max_dev=0.0)
    r.update(kw)
    return r


def test_device_names_map_to_their_peaks():
    assert C.device_peaks("NVIDIA H100 80GB HBM3")["bandwidth"] == 3.35e12
    assert C.device_peaks("NVIDIA H100 PCIe")["bandwidth"] == 2.0e12
    assert C.device_peaks("NVIDIA H200")["bandwidth"] == 4.8e12
    assert C.device_peaks("Some CPU") is None


def test_roofline_is_the_larger_bound_over_the_time():
    peaks = C.device_peaks("NVIDIA H100 80GB HBM3")
    compute = _row(flops=989e12 * 1e-3, bytes=1.0, dtype="torch.bfloat16")  # bound 1 ms, took 2 ms
    assert math.isclose(C.roofline_fraction(compute, peaks), 0.5)
    memory = _row(flops=1.0, bytes=3.35e12 * 1.5e-3, dtype="torch.bfloat16")  # bound 1.5 ms
    assert math.isclose(C.roofline_fraction(memory, peaks), 0.75)
    assert math.isnan(C.roofline_fraction(_row(), peaks))  # no flops/bytes
    assert math.isnan(C.roofline_fraction(_row(flops=1.0, bytes=1.0, dtype="torch.int8"), peaks))
    assert math.isnan(C.roofline_fraction(compute, None))


def test_table_gets_the_column_only_when_a_row_has_it():
    rows = [_row(), _row(flops=989e12 * 1e-3, bytes=1.0, dtype="torch.bfloat16")]
    assert "of roofline" not in C.format_table(rows)
    assert not C.add_roofline([_row()], "NVIDIA H100 80GB HBM3")
    assert C.add_roofline(rows, "NVIDIA H100 80GB HBM3")
    table = C.format_table(rows, markdown=True)
    assert "of roofline" in table and "| 50% |" in table


def test_gpu_conv_summary_checks_the_gpu_targets_and_reports_forced_backends():
    import bench_conv

    bf16, h100 = "torch.bfloat16", "NVIDIA H100 80GB HBM3"  # balance point 989e12 / 3.35e12 = 295 FLOP/B

    def r(workload, provider, time_s, ratio, flops):
        return dict(workload=workload, provider=provider, time_s=time_s, ratio=ratio, max_dev=1e-3, note="",
                    flops=flops, bytes=1e6, dtype=bf16, device="cuda")

    rows = [r("dw fwd", "eager conv+act", 2.0, 1.0, 1e7), r("dw fwd", "hierfast Conv2dAct", 1.0, 2.0, 1e7),
            r("dw fwd", "hierfast backend=triton", 0.5, 4.0, 1e7), r("dw fwd", "torch.compile", 1.5, 1.33, 1e7),
            r("3x3 fwd", "eager conv+act", 1.0, 1.0, 1e9), r("3x3 fwd", "hierfast Conv2dAct", 1.1, 0.91, 1e9),
            r("3x3 fwd", "torch.compile", 1.0, 1.0, 1e9),
            r("1x1 fwd", "eager conv+act", 1.0, 1.0, 1e8), r("1x1 fwd", "hierfast Conv2dAct", 0.9, 1.11, 1e8),
            r("1x1 fwd", "torch.compile", 1.0, 1.0, 1e8)]
    notes = bench_conv.gpu_summary(rows, h100)
    assert notes[0].startswith("GPU target >= torch.compile (default) on every row: MISSED (2/3; slower: 3x3 fwd")
    # memory-bound: dw (10 FLOP/B) and 1x1 (100 FLOP/B), not 3x3 (1000 FLOP/B); 1x1 at 1.11x misses 1.2x
    assert notes[1].startswith("GPU target >= 1.2x eager on the memory-bound rows (intensity < 295 FLOP/B")
    assert "MISSED (1/2; missed: 1x1 fwd 1.11x)" in notes[1]
    assert "backend choice: dw fwd: triton 2.00x the automatic choice's speed" in notes
    # GPU rows get the GPU targets, not the CPU ones (>= 1.3x on stem and depthwise)
    assert bench_conv.summary(rows) == bench_conv.gpu_summary(rows)
    assert not any("1.3x" in n for n in bench_conv.summary(rows))
    assert "no peak figures" in bench_conv.gpu_summary(rows, "Some GPU")[1]
