"""``hierfast analyze``: run :func:`hierfast.analyze` on factories named ``pkg.module:function``."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


# errors that mean "the input is wrong": one line on stderr and exit code 2, no traceback
USER_ERRORS = (ValueError, TypeError, KeyError)
# where hierfast checks its inputs: an error raised elsewhere (the user's model, data or
# factory, torch) is a bug to show with its traceback, whatever its type
_CHECKING = tuple(str(Path(__file__).resolve().parents[1] / d) for d in ("capture", "stats", "report", "transforms"))


def is_input_error(e: BaseException) -> bool:
    """Did one of hierfast's own argument/input checks raise ``e`` (its innermost frame)?"""
    tb = e.__traceback__
    if not isinstance(e, USER_ERRORS) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_CHECKING)


def user_error(cmd: str, e: BaseException) -> int:
    """Print ``hierfast <cmd>: <message>`` to stderr; the exit code of a user error."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() is a repr
    print(f"hierfast {cmd}: {msg}", file=sys.stderr)
    return 2


def _resolve(spec: str, flag: str):
    """``pkg.module:function`` -> the object it names (imported, not yet called)."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"{flag} must look like pkg.module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {flag} {spec!r}: {e} (is the module on PYTHONPATH?)") from None


def _build(obj, spec: str, flag: str, module_type: type | None = None):
    """Call a resolved factory (a plain object is used as it is); check a model's type."""
    out = obj() if callable(obj) else obj
    if module_type is not None and not isinstance(out, module_type):
        raise TypeError(f"{flag} {spec!r} gave a {type(out).__name__}, not a torch.nn.Module; name a function "
                        "returning the model")
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


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
    pa.add_argument("--max-batches", type=_positive_int, metavar="N")
    pa.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    pa.add_argument("--checkpoint", metavar="PATH", help="resumable checkpoint file")
    pa.add_argument("--out", required=True, type=Path, metavar="DIR")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.add_argument("--report", action="store_true", help="also write report.html (figures embedded) to --out")
    return pa


def run_analyze(args) -> int:
    try:
        res = _analyze(args)
    except USER_ERRORS as e:
        if not is_input_error(e):  # a KeyError in the model's forward is no input error: traceback
            raise
        return user_error("analyze", e)
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

        try:
            written = write_report(from_results(res), Path(args.out) / "report",
                                   title=f"hierfast analyze: {args.model}")
        except ValueError as e:
            return user_error("analyze", e)
        print(f"wrote {written['html']}")
    return 0


def _analyze(args):
    """Check the arguments (cheap ones first, before any model or data is built), then run."""
    from torch import nn

    from .engine import analyze

    _check_out_dir(args.out)
    specs = {flag: _resolve(spec, flag) for flag, spec in (("--model", args.model), ("--data", args.data),
                                                            ("--compare", args.compare)) if spec}
    _check_stats(args.stats)  # after the imports: a factory's module may register statistics
    _check_device(args.device)
    model = _build(specs["--model"], args.model, "--model", nn.Module)
    data = _build(specs["--data"], args.data, "--data")
    other = _build(specs["--compare"], args.compare, "--compare", nn.Module) if args.compare else None
    return analyze(model, data, layers=args.layers, stats=tuple(args.stats), compare_to=other, reduce=args.reduce,
                   device=args.device, max_batches=args.max_batches, progress=not args.no_progress,
                   checkpoint=args.checkpoint)


def _check_stats(names) -> None:
    from .statistics import available_statistics

    unknown = [n for n in names if n not in available_statistics()]
    if unknown:
        raise ValueError(f"--stats: unknown statistic(s) {unknown}; available: {available_statistics()}")


def _check_device(device) -> None:
    from .engine import _check_device as check

    try:
        check(device)
    except ValueError as e:  # the engine's message, under the flag's name
        raise ValueError(str(e).replace(f"device={device!r}", f"--device {device!r}", 1)) from None


def _check_out_dir(out: Path) -> None:
    """Fail before any work when --out cannot be written (nothing is lost later)."""
    import os

    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"--out {str(out)!r} is not writable (nearest existing: {str(probe)!r}); "
                         "choose a writable directory")
