"""``hierfast analyze``: run :func:`hierfast.analyze` on factories named ``pkg.module:function``."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def _factory(spec: str, flag: str):
    """``pkg.module:function`` -> the object ``function()`` returns."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise SystemExit(f"hierfast analyze: {flag} must look like pkg.module:function, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"hierfast analyze: cannot load {flag} {spec!r}: {e} (is the module on PYTHONPATH?)") from e
    return obj() if callable(obj) else obj


def add_analyze_parser(sub) -> argparse.ArgumentParser:
    pa = sub.add_parser("analyze", help="per-layer statistics (CKA) of a model over a dataset, streamed",
                        description="Run hierfast.analyze and write results.json, results.npz and cka.png to --out.")
    pa.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY", help="function returning the nn.Module")
    pa.add_argument("--data", required=True, metavar="PKG.MODULE:FACTORY",
                    help="function returning an iterable of batches (tensors, (x, y) tuples, dicts, a DataLoader)")
    pa.add_argument("--compare", metavar="PKG.MODULE:FACTORY", help="second model: model x compare CKA")
    pa.add_argument("--layers", nargs="+", metavar="NAME", help="layer names or glob patterns (default: every conv, "
                    "linear, recurrent and attention block)")
    pa.add_argument("--reduce", default="flatten", choices=("flatten", "avgpool", "mean", "cls", "tokens"))
    pa.add_argument("--stats", nargs="+", default=["cka"], metavar="NAME", help="registered statistics (default cka)")
    pa.add_argument("--max-batches", type=int, metavar="N")
    pa.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    pa.add_argument("--checkpoint", metavar="PATH", help="resumable checkpoint file")
    pa.add_argument("--out", required=True, type=Path, metavar="DIR")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.add_argument("--report", action="store_true", help="also write report.html (figures embedded) to --out")
    return pa


def run_analyze(args) -> int:
    from .engine import analyze

    _check_out_dir(args.out)
    model = _factory(args.model, "--model")
    data = _factory(args.data, "--data")
    other = _factory(args.compare, "--compare") if args.compare else None
    res = analyze(model, data, layers=args.layers, stats=tuple(args.stats), compare_to=other, reduce=args.reduce,
                  device=args.device, max_batches=args.max_batches, progress=not args.no_progress,
                  checkpoint=args.checkpoint)
    path = res.save(args.out)
    print(f"{res}\nwrote {path} and {path.with_suffix('.npz')}")
    if "cka" in res.stats:
        try:
            import matplotlib

            matplotlib.use("Agg")
            ax = res.plot_cka()
            png = Path(args.out) / "cka.png"
            ax.figure.savefig(png, dpi=120, bbox_inches="tight")
            print(f"wrote {png}")
        except ImportError:
            print("matplotlib not installed: no cka.png (pip install matplotlib)")
    if args.report:
        from ..report import write_report
        from ..report.schema import from_results

        written = write_report(from_results(res), Path(args.out) / "report", title=f"hierfast analyze: {args.model}")
        print(f"wrote {written['html']}")
    return 0


def _check_out_dir(out: Path) -> None:
    """Fail before any work when --out cannot be written (nothing is lost later)."""
    import os

    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise SystemExit(f"hierfast: --out {str(out)!r} is not writable (nearest existing: {str(probe)!r}); "
                         "choose a writable directory")
