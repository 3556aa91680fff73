"""`h3fusion score`: a reward model scores every (prompt, response) of sampled records, resumable."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_device_argument, add_overwrite_argument, nonneg_int, positive_int

HELP = "score sampled responses with a reward model (sequence classifier) through its own chat template"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward-model", required=True, help="reward model folder (sequence classifier)")
    parser.add_argument("--in", dest="in_path", required=True, help="sampled records JSONL (h3fusion sample)")
    parser.add_argument("--out", required=True, help="scored records JSONL (a reward in every response)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="conversations per forward (default 8)")
    parser.add_argument(
        "--reward-index",
        type=nonneg_int,
        default=None,
        help="which classifier output is the reward (required when the head has several)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a reward model that ships its own modelling code"
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="longer conversations keep their last tokens (counted in the summary)",
    )
    add_device_argument(parser)
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from h3fusion.cli.common import resolve_device
    from h3fusion.fuserl.report import progress_printer
    from h3fusion.fuserl.scoring import score_file
    from h3fusion.utils.files import OutputDirError

    printer = progress_printer("score", unit="records")
    try:
        summary = score_file(
            args.reward_model,
            args.in_path,
            args.out,
            batch_size=args.batch_size,
            reward_index=args.reward_index,
            trust_remote_code=args.trust_remote_code,
            dtype=args.dtype,
            max_length=args.max_length,
            device=resolve_device(args),
            overwrite=args.overwrite,
            progress=lambda done, total: printer("scored", done, total),
        )
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
