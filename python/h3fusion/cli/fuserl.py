"""`h3fusion fuserl`: sample -> score -> build -> FuseSFT -> FusePO [-> eval] -> report, resumable, from a config."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_device_argument

HELP = "the FuseRL pipeline from a YAML config: sample, score, build data, FuseSFT, FusePO, report (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML, or JSON); see the README")
    parser.add_argument("--out", default=None, help="run folder (default: the config's 'out')")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from h3fusion.fuserl.config import load_config
    from h3fusion.fuserl.pipeline import run_pipeline
    from h3fusion.fuserl.report import progress_printer
    from h3fusion.utils.files import OutputDirError

    try:
        cfg = load_config(args.config, out=args.out, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_pipeline(
            cfg,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
            on_sample=progress_printer("fuserl sample"),
        )
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "run": report["run"],
                "final_model": report["final_model"],
                "stages": {s["name"]: s["status"] for s in report["stages"]},
            }
        )
    )
    print(f"report: {cfg.out / 'report.md'}", file=sys.stderr)
    return 0
