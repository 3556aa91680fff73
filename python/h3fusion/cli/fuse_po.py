"""`h3fusion fuse-po`: reward-weighted preference optimisation (FusePO) of a causal LM on multi-source JSONL."""

from __future__ import annotations

import argparse
import json
import math

from .common import finite_float, model_path, nonneg_float, positive_float, positive_int, unit_interval
from .preference_training import (
    add_common_arguments,
    check_common_arguments,
    load_model_and_tokenizer,
    maybe_checkpoint,
    resume_checkpoint,
    save_results,
    summarise,
    training_arguments,
)

HELP = "FusePO: weighted DPO / length-normalised DPO / SimPO / WRPO / RLOO on multi-source JSONL records"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    add_common_arguments(parser)
    parser.add_argument("--loss", choices=["dpo", "dpo_norm", "simpo", "wrpo", "rloo"], default="dpo")
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--gamma", type=finite_float, default=0.5, help="SimPO target margin")
    parser.add_argument("--alpha-max", type=unit_interval, default=0.5, help="WRPO: final alpha of the linear ramp")
    parser.add_argument("--alpha-steps", type=positive_int, default=None, help="WRPO: ramp length (default: the run)")
    parser.add_argument("--kl-coef", type=nonneg_float, default=0.0, help="RLOO: KL-to-reference coefficient")
    parser.add_argument("--pair-mode", choices=["per_source", "global", "wrpo"], default=None,
                        help="pair builder mode (default: wrpo for --loss wrpo, else per_source)")  # fmt: skip
    parser.add_argument("--gap-min", type=nonneg_float, default=0.0, help="smallest reward gap of a kept pair")
    parser.add_argument("--gap-max", type=_gap_max, default=math.inf, help="largest reward gap of a kept pair (or inf)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="tau of the per-source pair weights")
    parser.add_argument("--target-source", default=None, help="source name of the target model (WRPO)")
    parser.add_argument("--rloo-temperature", type=positive_float, default=None,
                        help="RLOO: weight responses by K * softmax(r / tau) (default: unit weights)")  # fmt: skip
    parser.add_argument(
        "--ref-model", type=model_path, default=None, help="reference model directory (default: the initial model)"
    )
    parser.add_argument("--online-ref", action="store_true", help="run --ref-model every step instead of precomputing")
    parser.add_argument("--ref-cache-dir", default=None, help="reference log-prob cache (default: <out>/ref_cache)")


def _gap_max(text: str) -> float:
    if text.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return nonneg_float(text)


def run(args: argparse.Namespace) -> int:
    """Check data, options and --out; build pairs / RLOO groups; train while holding the lock on --out."""
    from h3fusion.data.preference import build_pairs, load_records, rloo_groups
    from h3fusion.utils.files import claim_output_dir

    if args.online_ref and args.ref_model is None:
        raise ValueError("--online-ref needs --ref-model")
    if args.gap_max < args.gap_min:
        raise ValueError(f"--gap-max {args.gap_max} is smaller than --gap-min {args.gap_min}")
    inputs = [args.model, args.data, args.ref_model]
    check_common_arguments(args, inputs)
    records = load_records(args.data)
    if args.loss == "rloo":
        items = rloo_groups(records, temperature=args.rloo_temperature)
    else:
        mode = args.pair_mode or ("wrpo" if args.loss == "wrpo" else "per_source")
        if args.loss == "wrpo" and args.target_source is None:
            raise ValueError("--loss wrpo needs --target-source (the source name of the target model's responses)")
        items = build_pairs(
            records,
            mode=mode,
            gap_min=args.gap_min,
            gap_max=args.gap_max,
            temperature=args.temperature,
            target_source=args.target_source,
        )
    if not items:
        raise ValueError(f"{args.data}: no pairs/groups survive the filters; widen --gap-min/--gap-max")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    ref_model = load_model_and_tokenizer(args.ref_model, args.dtype)[0] if args.ref_model else None
    with claim_output_dir(args.out, kind="fuse-po", overwrite=args.overwrite, resume=args.resume, inputs=inputs):
        summary = _train(args, model, ref_model, tokenizer, items)
    print(json.dumps(summary))
    return 0


def _train(args: argparse.Namespace, model, ref_model, tokenizer, items) -> dict:
    from pathlib import Path

    from h3fusion.trainers.fuse_po import FusePOTrainer

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
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    summary = {"command": "fuse-po", "loss": args.loss, "items": len(items), **summarise(trainer)}
    save_results(trainer, tokenizer, args.out, summary)
    return summary
