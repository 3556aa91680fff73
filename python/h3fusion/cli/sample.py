"""`h3fusion sample`: K responses per prompt from each source model, seeded per response, resumable."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_device_argument, add_overwrite_argument, nonneg_float, nonneg_int, positive_int, top_p

HELP = "sample K responses per prompt from each source model (FuseRL data, reproducible and resumable)"


def _source(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model expects NAME=DIR, got {spec!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        type=_source,
        required=True,
        metavar="NAME=DIR",
        help="a source model (causal LM folder with a chat template); repeat per source",
    )
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' string or chat 'messages' per line")
    parser.add_argument("--n", type=positive_int, default=4, help="samples per prompt per source (default 4)")
    parser.add_argument("--out", required=True, help="output JSONL (records: prompt + responses with source, text)")
    parser.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-p", type=top_p, default=0.95, help="nucleus mass (default 0.95)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--min-new-tokens", type=nonneg_int, default=1, help="EOS forbidden before (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-(source, prompt, sample) seeds")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows per generate call (default 16)")
    parser.add_argument(
        "--backend",
        choices=("auto", "hf", "vllm"),
        default="auto",
        help="auto: vllm when installed, else transformers generate",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument(
        "--on-empty",
        choices=("error", "drop"),
        default="error",
        help="an empty response stops the run with an error (default) or is dropped and counted",
    )
    add_device_argument(parser)
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from h3fusion.cli.common import resolve_device
    from h3fusion.fuserl.report import progress_printer
    from h3fusion.fuserl.sampling import SampleSettings, sample_to_file
    from h3fusion.utils.files import OutputDirError

    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        print(f"error: duplicate source names in {names}", file=sys.stderr)
        return 2
    settings = SampleSettings(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        backend=args.backend,
        dtype=args.dtype,
        on_empty=args.on_empty,
    )
    try:
        summary = sample_to_file(
            dict(args.model),
            args.prompts,
            args.out,
            settings,
            device=resolve_device(args),
            overwrite=args.overwrite,
            progress=progress_printer("sample"),
        )
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
