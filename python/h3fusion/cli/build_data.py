"""`h3fusion build-data`: split scored records into FuseSFT / FusePO data, count and list what yields nothing."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .common import add_overwrite_argument, finite_float, positive_float, positive_int, unit_interval

HELP = "split scored records into FuseSFT / FusePO sets, build weighted items, pairs or WRPO triplets, report counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="in_path", required=True, help="scored records JSONL (h3fusion score)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sft-ratio", type=unit_interval, default=0.4, help="share of prompts for SFT (default 0.4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--top-k", type=positive_int, default=None, help="SFT responses kept per prompt (default all)")
    parser.add_argument("--sft-temperature", type=positive_float, default=1.0, help="tau of the SFT weights")
    parser.add_argument(
        "--mode",
        choices=("per_source", "global", "wrpo", "rloo"),
        default="per_source",
        help="preference items: per-source pairs, global pairs, WRPO triplets or RLOO groups",
    )
    parser.add_argument("--gap-min", type=finite_float, default=0.0, help="smallest reward gap of a kept pair")
    parser.add_argument("--gap-max", type=float, default=math.inf, help="largest reward gap of a kept pair")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="tau of the per-source pair weights")
    parser.add_argument("--target-source", default=None, help="the target model's source name (--mode wrpo)")
    parser.add_argument(
        "--rloo-temperature",
        type=positive_float,
        default=None,
        help="RLOO weights K * softmax(r / tau) (default unit weights)",
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from h3fusion.fuserl.build import BuildSettings, build_data, load_scored_records
    from h3fusion.utils.files import OutputDirError, prepare_output_dir

    settings = BuildSettings(
        sft_ratio=args.sft_ratio,
        seed=args.seed,
        top_k=args.top_k,
        sft_temperature=args.sft_temperature,
        mode=args.mode,
        gap_min=args.gap_min,
        gap_max=args.gap_max,
        temperature=args.temperature,
        target_source=args.target_source,
        rloo_temperature=args.rloo_temperature,
    )
    try:
        settings.validate()
        records = load_scored_records(args.in_path)
        out = prepare_output_dir(args.out, kind="build-data", overwrite=args.overwrite, inputs=[args.in_path])
        stats = build_data(records, out, settings)
    except (ValueError, FileNotFoundError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in stats.items() if k != "settings"}))
    if stats["skipped_po_records"] or stats["skipped_sft_records"]:
        print(
            f"{stats['skipped_sft_records'] + stats['skipped_po_records']} record(s) yield no item: "
            f"see {out / 'skipped_records.jsonl'}",
            file=sys.stderr,
        )
    return 0
