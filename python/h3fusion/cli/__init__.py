"""The `h3fusion` command: one subcommand per module in this package.

Each subcommand module `h3fusion/cli/<name>.py` defines
    HELP: str                                   one line for `h3fusion --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        the exit status
and is imported only when its subcommand runs, so `h3fusion --help` stays fast.

Errors: a bad flag value is argparse's one-line usage error (exit 2). A bad input found while running (a file that
does not exist or is corrupted, an output folder we must not touch, a model that cannot be fused...) raises
ValueError or OSError with a message naming the file / argument; `main` prints it as one `error:` line and returns
2. Set H3FUSION_TRACEBACK=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module under h3fusion.cli
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "fuse": "fuse",
    "export": "export",
    "train": "train",
    "fuse-sft": "fuse_sft",
    "fuse-po": "fuse_po",
    "route-report": "route_report",
    "bench": "bench",
    "sample": "sample",
    "score": "score",
    "build-data": "build_data",
    "fuserl": "fuserl",
    "eval": "eval",
}


def _load(name: str):
    return importlib.import_module(f"h3fusion.cli.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """The `h3fusion` parser with one subparser per entry of `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="h3fusion",
        description="Fuse aligned LLMs into a mixture of experts (H3Fusion) and train with weighted preference fusion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"h3fusion.cli.{SUBCOMMANDS[name]}":
                raise
            continue  # a subcommand not written yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `h3fusion ARGV`; returns the exit status (2 for a bad flag value or input, see the module docstring)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        # argparse before Python 3.12 turns `--flag=--` into an empty list, skipping the flag's type check
        if arg.startswith("--") and arg.endswith("=--"):
            parser.error(f"argument {arg[:-3]}: expected a value, got '--'")
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as exc:
        if os.environ.get("H3FUSION_TRACEBACK"):
            raise
        print(f"h3fusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy torch.distributed's process group if a subcommand (a Trainer under torchrun) created one.

    With gloo, a rank that exits with the group alive can abort at interpreter shutdown ("terminate called without
    an active exception") after all its work is done, turning a good run into a failed exit status.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
