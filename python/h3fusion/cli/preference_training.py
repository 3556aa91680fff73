"""What `fuse-sft` and `fuse-po` share: their common flags, model loading, TrainingArguments and the saved results.

Not a subcommand (it is not in `SUBCOMMANDS`); both subcommands import it, so neither imports the other.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import (
    add_device_argument,
    add_overwrite_argument,
    int_or_minus_one,
    load_pretrained,
    model_path,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)

__all__ = [
    "add_common_arguments",
    "check_common_arguments",
    "load_model_and_tokenizer",
    "maybe_checkpoint",
    "resume_checkpoint",
    "save_results",
    "summarise",
    "training_arguments",
]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data, output and optimisation arguments shared by fuse-sft and fuse-po."""
    parser.add_argument("--model", required=True, type=model_path, help="model directory (causal LM + tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL: {prompt, responses: [{text, source, reward}]} per line")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (model/ and train_log.json): new, empty, or a previous output of the same kind with "
        "--overwrite",
    )
    add_overwrite_argument(parser)
    parser.add_argument("--max-length", type=positive_int, default=1024, help="token budget of prompt + response")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None, help="prompt tokens (default: half)")
    parser.add_argument("--chat-template", action="store_true", help="format prompts with the tokenizer's template")
    parser.add_argument("--epochs", type=positive_float, default=1.0)
    parser.add_argument("--max-steps", type=int_or_minus_one, default=-1, help="stop after N steps (over --epochs)")
    parser.add_argument("--lr", type=positive_float, default=1e-6, help="learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="items per device per step")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    parser.add_argument("--warmup-steps", type=nonneg_float, default=0, help="warmup steps, or a run ratio if < 1")
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--save-steps", type=nonneg_int, default=0, help="checkpoint every N steps (0: at the end)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a previous run in --out from its latest checkpoint (written every --save-steps); without "
        "one, start again in the same folder",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the model is loaded in")  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    add_device_argument(parser, indexed=False)


def check_common_arguments(args: argparse.Namespace, inputs: list[Any]) -> None:
    """Everything checkable before loading anything: the data file, the output folder, the device.

    Raises:
        ValueError / OutputDirError: naming the argument.
    """
    from h3fusion.utils.files import check_output_dir

    from .common import resolve_device

    if not os.path.isfile(args.data):
        what = "is a directory" if os.path.isdir(args.data) else "does not exist"
        raise ValueError(f"--data: {args.data} {what}; expected a JSONL file")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    check_output_dir(args.out, overwrite=args.overwrite, resume=args.resume, inputs=inputs)
    args.device = resolve_device(args)


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """With --resume, the latest complete checkpoint under OUT/checkpoints (validated, so a corrupted file is named
    before training starts); None to start from the beginning."""
    if not args.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    from h3fusion.trainers.checkpoint import check_checkpoint_dir

    folder = Path(args.out) / "checkpoints"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is not None:
        check_checkpoint_dir(last, "--resume")
    return last


def load_model_and_tokenizer(path: str, dtype: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from one directory; the tokenizer pads with EOS when it has no pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, path, "--model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(AutoModelForCausalLM, path, "--model", dtype=getattr(torch, dtype))
    return model, tokenizer


def maybe_checkpoint(model: Any, args: argparse.Namespace) -> Any:
    """The model, with activation checkpointing enabled when --gradient-checkpointing is given."""
    # enabled on the model itself: the TrainingArguments field changed name within transformers 5.x
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def training_arguments(args: argparse.Namespace):
    """transformers.TrainingArguments from the common CLI arguments."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=int(args.warmup_steps) if args.warmup_steps >= 1 else args.warmup_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def save_results(trainer: Any, tokenizer: Any, out: str, summary: dict) -> None:
    """Write <out>/model (staging folder, then rename) and <out>/train_log.json (atomic)."""
    import shutil

    from h3fusion.trainers.checkpoint import staging_dir_for
    from h3fusion.utils.files import atomic_replace_dir, atomic_write_json

    out_dir = Path(out)
    tmp = Path(staging_dir_for(str(out_dir), "model"))  # the same path on every rank
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    # every rank calls save_model (FSDP / DeepSpeed gather the weights collectively); only the main one writes
    trainer.save_model(str(tmp))
    if not main:
        return
    tokenizer.save_pretrained(str(tmp))
    atomic_replace_dir(tmp, out_dir / "model")
    atomic_write_json(out_dir / "train_log.json", {**summary, "log_history": trainer.state.log_history}, indent=1)


def summarise(trainer: Any) -> dict:
    """{"steps", "first_loss", "last_loss"} of a finished run (losses None when nothing was logged)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}  # fmt: skip
