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
