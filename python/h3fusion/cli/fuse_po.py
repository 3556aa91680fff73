"""`h3fusion fuse-po`: reward-weighted preference optimisation (FusePO) of a causal LM on multi-source JSONL."""

from __future__ import annotations

import argparse
import json
import math

from .fuse_sft import (
    add_common_arguments,
    load_model_and_tokenizer,
    maybe_checkpoint,
    save_results,
    summarise,
    training_arguments,
)

HELP = "FusePO: weighted DPO / length-normalised DPO / SimPO / WRPO / RLOO on multi-source JSONL records"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--loss", choices=["dpo", "dpo_norm", "simpo", "wrpo", "rloo"], default="dpo")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=0.5, help="SimPO target margin")
    parser.add_argument("--alpha-max", type=float, default=0.5, help="WRPO: final alpha of the linear ramp")
    parser.add_argument("--alpha-steps", type=int, default=None, help="WRPO: ramp length in steps (default: run)")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="RLOO: KL-to-reference coefficient")
    parser.add_argument("--pair-mode", choices=["per_source", "global", "wrpo"], default=None,
                        help="pair builder mode (default: wrpo for --loss wrpo, else per_source)")  # fmt: skip
    parser.add_argument("--gap-min", type=float, default=0.0, help="smallest reward gap of a kept pair")
    parser.add_argument("--gap-max", type=float, default=math.inf, help="largest reward gap of a kept pair")
    parser.add_argument("--temperature", type=float, default=1.0, help="tau of the per-source pair weights")
    parser.add_argument("--target-source", default=None, help="source name of the target model (WRPO)")
    parser.add_argument("--rloo-temperature", type=float, default=None,
                        help="RLOO: weight responses by K * softmax(r / tau) (default: unit weights)")  # fmt: skip
    parser.add_argument("--ref-model", default=None, help="reference model directory (default: the initial model)")
    parser.add_argument("--online-ref", action="store_true", help="run --ref-model every step instead of precomputing")
    parser.add_argument("--ref-cache-dir", default=None, help="reference log-prob cache (default: <out>/ref_cache)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from h3fusion.data.preference import build_pairs, load_records, rloo_groups
    from h3fusion.trainers.fuse_po import FusePOTrainer

    if args.online_ref and args.ref_model is None:
        raise SystemExit("--online-ref needs --ref-model")
    records = load_records(args.data)
    if args.loss == "rloo":
        items = rloo_groups(records, temperature=args.rloo_temperature)
    else:
        mode = args.pair_mode or ("wrpo" if args.loss == "wrpo" else "per_source")
        if args.loss == "wrpo" and args.target_source is None:
            raise SystemExit("--loss wrpo needs --target-source (the source name of the target model's responses)")
        items = build_pairs(
            records,
            mode=mode,
            gap_min=args.gap_min,
            gap_max=args.gap_max,
            temperature=args.temperature,
            target_source=args.target_source,
        )
    if not items:
        raise SystemExit(f"{args.data}: no pairs/groups survive the filters; widen --gap-min/--gap-max")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    ref_model = load_model_and_tokenizer(args.ref_model, args.dtype)[0] if args.ref_model else None
    trainer = FusePOTrainer(
        maybe_checkpoint(model, args),
        ref_model,
        training_arguments(args),
        items,
        None,
        tokenizer,
        loss=args.loss,
        beta=args.beta,
        gamma=args.gamma,
        alpha_max=args.alpha_max,
        alpha_steps=args.alpha_steps,
        kl_coef=args.kl_coef,
        precompute_ref_logps=not args.online_ref,
        ref_cache_dir=args.ref_cache_dir or str(Path(args.out) / "ref_cache"),
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        chat_template=args.chat_template,
    )
    trainer.train()
    summary = {"command": "fuse-po", "loss": args.loss, "items": len(items), **summarise(trainer)}
    save_results(trainer, tokenizer, args.out, summary)
    print(json.dumps(summary))
    return 0
