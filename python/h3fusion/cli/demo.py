"""`h3fusion demo [--out DIR] [--seed N]`: the built-in default, end to end on the CPU with no downloads."""

from __future__ import annotations

import argparse

from .common import add_experts_implementation_argument, add_overwrite_argument, positive_int

HELP = "run H3Fusion end to end on tiny generated models and data (CPU, a few minutes, no downloads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    parser.add_argument(
        "--out",
        default="h3fusion-demo",
        help="report folder: new, empty, or a previous demo report with --overwrite (default: %(default)s)",
    )
    add_overwrite_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for data, models and training (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a much smaller, faster run (smoke test)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_experts_implementation_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check --out; run the demo into it (locked); print where the report is."""
    from h3fusion.utils.files import check_output_dir, claim_output_dir

    check_output_dir(args.out, overwrite=args.overwrite)

    from h3fusion.demo import run_demo

    with claim_output_dir(args.out, kind="demo", overwrite=args.overwrite) as out:
        run_demo(
            str(out),
            seed=args.seed,
            quick=args.quick,
            progress=not args.no_progress,
            threads=args.threads,
            experts_implementation=args.experts_implementation,
        )
    print(f"report written to {args.out}/ (report.md, results.json, route_report.png, route_report.json)")
    return 0
