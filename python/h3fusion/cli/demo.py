"""`h3fusion demo [--out DIR] [--seed N]`: the built-in default, end to end on the CPU with no downloads."""

from __future__ import annotations

import argparse

from .common import add_experts_implementation_argument

HELP = "run H3Fusion end to end on tiny generated models and data (CPU, a few minutes, no downloads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="h3fusion-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, models and training (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a much smaller, faster run (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_experts_implementation_argument(parser)


def run(args: argparse.Namespace) -> int:
    from h3fusion.demo import run_demo

    run_demo(
        args.out,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
        threads=args.threads,
        experts_implementation=args.experts_implementation,
    )
    print(f"report written to {args.out}/ (report.md, results.json, route_report.png, route_report.json)")
    return 0
