"""`h3fusion bench`: run the kernel benchmarks (h3fusion.bench) and print/save their tables; works from an installed
package (`python -m h3fusion.bench` is the same)."""

from __future__ import annotations

import argparse

from .common import add_device_argument, comma_names, positive_int

HELP = "benchmark the kernels against the PyTorch reference (tables + JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    add_device_argument(parser, indexed=False)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument(
        "--only", type=comma_names(), default=None, help="comma-separated benches: moe,logprob,hf_moe (default: all)"
    )
    parser.add_argument("--out", default="bench_results.json", help="JSON output path (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: 2 on the CPU, torch's choice on CUDA)",
    )


def run(args: argparse.Namespace) -> int:
    """Check --out before anything runs, then run the benchmarks (h3fusion.bench.runner)."""
    from h3fusion.utils.files import check_output_file

    check_output_file(args.out, "--out")  # before the benches run: a bad path must not lose their results
    from h3fusion.bench.runner import run as run_benches

    return run_benches(args)
