"""`h3fusion bench`: run the benchmark suite (benchmarks/run.py of the source tree) and print/save its tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_device_argument, comma_names, positive_int

HELP = "benchmark the kernels against the PyTorch reference (tables + JSON)"


def _benchmarks_root() -> Path | None:
    """The directory holding `benchmarks/`: the source tree next to the `h3fusion_ext` package, if there is one."""
    import h3fusion_ext

    root = Path(h3fusion_ext.__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "run.py").is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    add_device_argument(parser, indexed=False)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument(
        "--only", type=comma_names(), default=None, help="comma-separated benches: moe,logprob,hf_moe (default: all)"
    )
    parser.add_argument("--out", default="bench_results.json", help="JSON output path (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")


def run(args: argparse.Namespace) -> int:
    """Check --out before anything runs, then hand over to the benchmark runner of the source tree."""
    from h3fusion.utils.files import check_output_file

    check_output_file(args.out, "--out")  # before the benches run: a bad path must not lose their results
    root = _benchmarks_root()
    if root is None:
        print(
            "error: the benchmarks/ directory was not found next to the h3fusion_ext package; `h3fusion bench` "
            "needs a source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import run as bench_run

    argv = ["--out", args.out] + (["--quick"] if args.quick else [])
    argv += ["--device", args.device] if args.device else []
    argv += ["--only", ",".join(args.only)] if args.only else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    return bench_run.main(argv)
