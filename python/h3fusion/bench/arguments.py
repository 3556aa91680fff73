"""The flags of `h3fusion bench` / `python -m h3fusion.bench`, defined once (torch-free, so `--help` stays fast)."""

from __future__ import annotations

import argparse

from ..cli.common import add_device_argument, comma_names, positive_int

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --quick, --only, --out, --threads."""
    add_device_argument(parser, indexed=False)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument(
        "--only",
        type=comma_names(),
        default=None,
        help="comma-separated benches: moe,logprob,hf_moe,lora,fusion (default: all but fusion, which writes GBs)",
    )
    parser.add_argument("--out", default="bench_results.json", help="JSON output path (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: 2 on the CPU, torch's choice on CUDA)",
    )
