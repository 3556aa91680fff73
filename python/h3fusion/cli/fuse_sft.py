"""`h3fusion fuse-sft`: reward-weighted SFT (FuseSFT) of a causal LM on multi-source JSONL records."""

from __future__ import annotations

import argparse
import json

from .common import positive_float, positive_int
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

HELP = "FuseSFT: reward-weighted SFT of a model directory on multi-source JSONL records"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    add_common_arguments(parser)
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="responses kept per prompt, by reward (default all)"
    )
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="tau of the softmax(r / tau) weights")
    parser.add_argument("--reduction", choices=["token_mean", "sum"], default="token_mean")


def run(args: argparse.Namespace) -> int:
    """Check data and --out; build the weighted SFT items; train while holding the lock on --out."""
    from h3fusion.data.preference import load_records, sft_examples
    from h3fusion.utils.files import claim_output_dir

    inputs = [args.model, args.data]
    check_common_arguments(args, inputs)
    items = sft_examples(load_records(args.data), top_k=args.top_k, temperature=args.temperature)
    if not items:
        raise ValueError(f"--data {args.data}: no responses to train on")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    with claim_output_dir(args.out, kind="fuse-sft", overwrite=args.overwrite, resume=args.resume, inputs=inputs):
        summary = _train(args, model, tokenizer, items)
    print(json.dumps(summary))
    return 0


def _train(args: argparse.Namespace, model, tokenizer, items) -> dict:
    from h3fusion.trainers.fuse_sft import FuseSFTTrainer

    trainer = FuseSFTTrainer(
        maybe_checkpoint(model, args),
        training_arguments(args),
        items,
        None,
        tokenizer,
        reduction=args.reduction,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        chat_template=args.chat_template,
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    summary = {"command": "fuse-sft", "items": len(items), **summarise(trainer)}
    save_results(trainer, tokenizer, args.out, summary)
    return summary
