"""The `h3fusion` command: one subcommand per module in this package.

Each subcommand module `h3fusion/cli/<name>.py` defines
    HELP: str                                   one line for `h3fusion --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        the exit status
and is imported only when its subcommand runs, so `h3fusion --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under h3fusion.cli
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "fuse": "fuse",
    "train": "train",
    "fuse-sft": "fuse_sft",
    "fuse-po": "fuse_po",
    "route-report": "route_report",
    "bench": "bench",
}


def _load(name: str):
    return importlib.import_module(f"h3fusion.cli.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
