"""`h3fusion fuse-sft`: reward-weighted SFT (FuseSFT) of a causal LM on multi-source JSONL records."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

HELP = "FuseSFT: reward-weighted SFT of a model directory on multi-source JSONL records"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data, output and optimisation arguments shared by fuse-sft and fuse-po."""
    parser.add_argument("--model", required=True, help="model directory (transformers causal LM + tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL: {prompt, responses: [{text, source, reward}]} per line")
    parser.add_argument("--out", required=True, help="output directory (model/ and train_log.json)")
    parser.add_argument("--max-length", type=int, default=1024, help="token budget of prompt + response")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="prompt token budget (default half)")
    parser.add_argument("--chat-template", action="store_true", help="format prompts with the tokenizer's template")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=4, help="items per device per step")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--warmup-steps", type=float, default=0, help="warmup steps, or a ratio of the run if < 1")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the model is loaded in")  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def load_model_and_tokenizer(path: str, dtype: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from one directory; the tokenizer pads with EOS when it has no pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, tokenizer


def maybe_checkpoint(model: Any, args: argparse.Namespace) -> Any:
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
        use_cpu=args.cpu,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def save_results(trainer: Any, tokenizer: Any, out: str, summary: dict) -> None:
    """Write <out>/model (temp dir, then rename) and <out>/train_log.json (temp file, then rename)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.tmp"
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    # every rank calls save_model (FSDP / DeepSpeed gather the weights collectively); only the main one writes
    trainer.save_model(str(tmp))
    if not main:
        return
    tokenizer.save_pretrained(str(tmp))
    final = out_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log = {**summary, "log_history": trainer.state.log_history}
    fd, tmp_log = tempfile.mkstemp(prefix=".train_log.", suffix=".json", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    os.replace(tmp_log, out_dir / "train_log.json")


def summarise(trainer: Any) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--top-k", type=int, default=None, help="responses kept per prompt, by reward (default all)")
    parser.add_argument("--temperature", type=float, default=1.0, help="tau of the softmax(r / tau) weights")
    parser.add_argument("--reduction", choices=["token_mean", "sum"], default="token_mean")


def run(args: argparse.Namespace) -> int:
    from h3fusion.data.preference import load_records, sft_examples
    from h3fusion.trainers.fuse_sft import FuseSFTTrainer

    items = sft_examples(load_records(args.data), top_k=args.top_k, temperature=args.temperature)
    if not items:
        raise SystemExit(f"{args.data}: no responses to train on")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
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
    trainer.train()
    summary = {"command": "fuse-sft", "items": len(items), **summarise(trainer)}
    save_results(trainer, tokenizer, args.out, summary)
    print(json.dumps(summary))
    return 0
