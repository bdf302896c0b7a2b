"""Command line: ``hierfast info`` | ``hierfast demo`` | ``hierfast analyze``."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import hierfast

    if args.json:
        print(json.dumps(hierfast.info(), indent=2, default=str))
    else:
        print(hierfast.format_info())
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, seed=args.seed)


def _cmd_analyze(args) -> int:
    from .capture.cli import run_analyze

    return run_analyze(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hierfast", description="Measure the hierarchy of representations in deep networks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,demo,analyze}")
    pi = sub.add_parser("info", help="versions and available backends")
    pi.add_argument("--json", action="store_true", help="print the info dict as JSON")
    pi.set_defaults(func=_cmd_info)
    pd = sub.add_parser("demo", help="train a small CNN on real digits and print its layer x layer CKA")
    pd.add_argument("--quick", action="store_true", help="fewer training epochs")
    pd.add_argument("--seed", type=int, default=0)
    pd.set_defaults(func=_cmd_demo)
    from .capture.cli import add_analyze_parser

    add_analyze_parser(sub).set_defaults(func=_cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
