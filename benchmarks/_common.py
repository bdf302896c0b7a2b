"""Shared timing, metadata and table helpers for the hierfast benchmarks.

Method (benchmarks/README.md): one untimed warm-up call, then ``repeats`` timed calls
(device synchronised inside the timed region), median reported with the min-max
spread. A benchmark module exposes ``run(quick: bool) -> list[dict]`` returning rows
with the keys of :data:`ROW_KEYS` (extra keys are allowed and ignored by the table),
and optionally ``summary(rows) -> list[str]`` (target checks printed under the table).
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

# Required keys of a result row. Optional: spread_s (min, max), repeats, gflops, baseline.
ROW_KEYS = ("workload", "provider", "time_s", "ratio", "max_dev", "note")


def setup_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads (default: HIERFAST_BENCH_THREADS or 2)."""
    n = int(n or os.environ.get("HIERFAST_BENCH_THREADS", 2))
    torch.set_num_threads(n)
    return n


def sync(device=None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], *, repeats: int | None = None, budget_s: float = 6.0,
          min_repeats: int = 3, max_repeats: int = 15, device=None) -> dict:
    """Time ``fn``: one warm-up call, then repeats (adaptive: as many as fit in
    ``budget_s``, clamped to [min_repeats, max_repeats]) unless ``repeats`` is given.

    Returns {"median", "min", "max", "repeats", "times", "warmup", "result"}; ``result``
    is the value of the last call (used for the accuracy check, outside the timing).
    """
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    warm = time.perf_counter() - t0
    if repeats is None:
        repeats = max(min_repeats, min(max_repeats, int(budget_s / max(warm, 1e-6))))
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats,
            "times": times, "warmup": warm, "result": result}


def row(workload: str, provider: str, timing: dict | None = None, *, ratio: float = math.nan,
        max_dev: float = math.nan, note: str = "", **extra) -> dict:
    r = {"workload": workload, "provider": provider,
         "time_s": timing["median"] if timing else math.nan, "ratio": ratio, "max_dev": max_dev, "note": note}
    if timing:
        r["spread_s"] = (timing["min"], timing["max"])
        r["repeats"] = timing["repeats"]
    r.update(extra)
    return r


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(extra: tuple[str, ...] = ()) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("hierfast", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sgemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GEMM rate (GFLOP/s) of this machine through torch: the
    practical peak the Gram-bound rows are compared with."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


def header(threads: int, extra_versions: tuple[str, ...] = ()) -> list[str]:
    from hierfast import backends

    try:
        bk = ", ".join(b for b in backends.BACKENDS if backends.backend_status(b)["available"])
    except Exception:  # noqa: BLE001 - the header must never stop a benchmark
        bk = "?"
    v = versions(extra_versions)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    return [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}   git: {git_sha()}",
        f"device: {dev}   torch threads: {threads}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"hierfast backends available: {bk}",
    ]


def _fmt_time(t: float) -> str:
    if not math.isfinite(t):
        return "—"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_num(x: float, fmt: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, fmt)


# Dense peak rates (FLOP/s, tensor cores where the dtype has them; float32 = plain FMA) and
# HBM bandwidth (B/s) from the vendors' datasheets, matched by substring of the device name.
DEVICE_PEAKS = {
    "H200": {"bandwidth": 4.8e12, "torch.bfloat16": 989e12, "torch.float16": 989e12, "torch.float32": 67e12},
    "H100 PCIe": {"bandwidth": 2.0e12, "torch.bfloat16": 756e12, "torch.float16": 756e12, "torch.float32": 51e12},
    "H100": {"bandwidth": 3.35e12, "torch.bfloat16": 989e12, "torch.float16": 989e12, "torch.float32": 67e12},
    "A100": {"bandwidth": 2.0e12, "torch.bfloat16": 312e12, "torch.float16": 312e12, "torch.float32": 19.5e12},
}


def device_peaks(name: str) -> dict | None:
    """The :data:`DEVICE_PEAKS` entry whose key occurs in ``name`` (first match), else None."""
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def roofline_fraction(r: dict, peaks: dict | None) -> float:
    """Lower bound of the row's time (max of flops/peak and bytes/bandwidth, from the row's
    ``flops``, ``bytes``, ``dtype``) over its measured time: 1.0 = at the roofline. NaN when
    the row or the device lacks what it needs."""
    if not peaks or "flops" not in r or "bytes" not in r or not math.isfinite(r.get("time_s", math.nan)):
        return math.nan
    peak = peaks.get(str(r.get("dtype")))
    if peak is None:
        return math.nan
    return max(r["flops"] / peak, r["bytes"] / peaks["bandwidth"]) / r["time_s"]


def add_roofline(rows: list[dict], device_name: str) -> bool:
    """Sets ``row["roofline"]`` for every row that can have one; returns whether any did."""
    peaks = device_peaks(device_name)
    any_set = False
    for r in rows:
        f = roofline_fraction(r, peaks)
        if math.isfinite(f):
            r["roofline"] = f
            any_set = True
    return any_set


def format_table(rows: list[dict], markdown: bool = False, note_width: int = 70) -> str:
    """One table: workload | provider | median time (min-max, repeats) | ratio | max dev | GFLOP/s |
    [fraction of the roofline bound, when any row has one] | note. Notes longer than
    ``note_width`` become numbered footnotes under the table."""
    roof = any("roofline" in r for r in rows)
    cols = ["workload", "provider", "median time (min–max, reps)", "× vs baseline", "max abs dev vs f64",
            "GFLOP/s"] + (["of roofline"] if roof else []) + ["notes"]
    body, foot = [], []
    for r in rows:
        t = _fmt_time(r["time_s"])
        if "spread_s" in r and math.isfinite(r["time_s"]):
            t += f" ({_fmt_time(r['spread_s'][0])}–{_fmt_time(r['spread_s'][1])}, {r['repeats']})"
        note = r.get("note", "")
        if len(note) > note_width:
            foot.append(note)
            note = f"[{len(foot)}]"
        body.append([r["workload"], r["provider"], t, _fmt_num(r["ratio"], ".2f"), _fmt_num(r["max_dev"], ".1e"),
                     _fmt_num(r.get("gflops", math.nan), ".0f")]
                    + ([_fmt_num(100 * r.get("roofline", math.nan), ".0f") + ("%" if "roofline" in r else "")]
                       if roof else []) + [note])
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
    else:
        w = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols)), "  ".join("-" * x for x in w)]
        lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(b)) for b in body]
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(foot, 1)] if foot else []
    return "\n".join(lines)
