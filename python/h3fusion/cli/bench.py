"""`h3fusion bench`: run the kernel benchmarks (h3fusion.bench) and print/save their tables; works from an installed
package (`python -m h3fusion.bench` is the same)."""

from __future__ import annotations

import argparse

from ..bench.arguments import add_arguments  # noqa: F401  (the subcommand's flags, defined once)

HELP = "benchmark the kernels against transformers' experts implementations and a dense mm (tables + JSON)"


def run(args: argparse.Namespace) -> int:
    """Check --out before anything runs, then run the benchmarks (h3fusion.bench.runner)."""
    from h3fusion.utils.files import check_output_file

    check_output_file(args.out, "--out")  # before the benches run: a bad path must not lose their results
    from h3fusion.bench.runner import run as run_benches

    return run_benches(args)
