"""Flags and argument types shared by several subcommands: one definition each.

Argument types raise `argparse.ArgumentTypeError`, so a bad value ends in argparse's one-line usage error with exit
status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "add_device_argument",
    "add_overwrite_argument",
    "finite_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "resolve_device",
    "unit_interval",
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The one `--device` flag of every subcommand that runs a model: cpu, cuda or cuda:N (default: cuda if any)."""
    parser.add_argument(
        "--device",
        default=None,
        type=_device,
        metavar="DEVICE",
        help="cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu)",
    )


def _device(text: str) -> str:
    head, _, index = text.partition(":")
    if head not in {"cpu", "cuda"} or (index and not index.isdigit()) or (head == "cpu" and index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def resolve_device(args: argparse.Namespace) -> str:
    """The device a subcommand runs on: `--device`, else cuda when available, else cpu (imports torch)."""
    if getattr(args, "device", None):
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`: replace a previous h3fusion output in --out (a folder of anything else is never replaced)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous h3fusion output in --out (other folders are never replaced)",
    )


# the choices of h3fusion.models.hf_experts.EXPERTS_IMPLEMENTATIONS (spelt out: this module must not import torch)
EXPERTS_IMPLEMENTATIONS = ("h3fusion", "grouped_mm", "eager")


def add_experts_implementation_argument(parser: argparse.ArgumentParser) -> None:
    """`--experts-implementation`: what runs the MoE blocks (default h3fusion: topk_route + moe_ffn)."""
    parser.add_argument(
        "--experts-implementation",
        choices=EXPERTS_IMPLEMENTATIONS,
        default="h3fusion",
        help="what runs the MoE blocks: h3fusion (our topk_route + moe_ffn kernels), or transformers' grouped_mm "
        "or eager (default: %(default)s)",
    )
