"""Run hierfast benchmarks and print one table.

    python benchmarks/run.py                 # every benchmarks/bench_*.py
    python benchmarks/run.py cka             # only bench_cka.py
    python benchmarks/run.py cka --quick     # small sizes, for a smoke run
    python benchmarks/run.py cka --markdown  # the table as Markdown (for BENCHMARKS.md)

A benchmark module ``benchmarks/bench_<name>.py`` plugs in by defining
``run(quick: bool) -> list[dict]`` (rows with keys workload, provider, time_s, ratio,
max_dev, note; see _common.ROW_KEYS) and optionally ``summary(rows) -> list[str]``.
Method: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import torch  # noqa: E402


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, or HIERFAST_BENCH_THREADS)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and header as JSON")
    args = ap.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    threads = _common.setup_threads(args.threads)
    mods = {n: importlib.import_module(f"bench_{n}") for n in names}
    extra = ("ckatorch", "torch-cka") if "cka" in names else ()
    head = _common.header(threads, extra) + [f"command: {' '.join([Path(sys.executable).name] + sys.argv)}"
                                              + ("   (quick)" if args.quick else "")]
    rows, notes = [], []
    t0 = time.perf_counter()
    for n, mod in mods.items():
        r = mod.run(quick=args.quick)
        for x in r:
            missing = [k for k in _common.ROW_KEYS if k not in x]
            if missing:
                raise KeyError(f"bench_{n}.run() returned a row without {missing}: {x}")
        rows += r
        if hasattr(mod, "summary"):
            notes += mod.summary(r)
    if torch.cuda.is_available() and _common.add_roofline(rows, torch.cuda.get_device_name()):
        head.append("of roofline: lower bound max(FLOPs / peak, bytes / bandwidth) over the measured time, "
                    "peaks from benchmarks/_common.py DEVICE_PEAKS")
    print("\n".join(head))
    print(f"wall time of the run: {time.perf_counter() - t0:.0f} s\n")
    print(_common.format_table(rows, markdown=args.markdown))
    if notes:
        print()
        print("\n".join(("- " if args.markdown else "") + s for s in notes))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "rows": rows, "summary": notes}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
