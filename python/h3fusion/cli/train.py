"""`h3fusion train FUSED_DIR --data [CATEGORY=]FILE ... --out DIR`: H3Fusion training of a fused model.

Runs unchanged under `torchrun --nproc_per_node N -m h3fusion train ...` or `accelerate launch -m h3fusion train
...` (it is a `transformers.Trainer`). The final model is written to `<out>/final` as a plain Hugging Face
checkpoint (LoRA experts merged), loadable with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse

from .common import add_experts_implementation_argument
from .route_report import add_data_arguments, load_data_arguments

HELP = "train a fused MoE's routers and experts with the LM, gating and drift losses (H3Fusion)"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="fused model directory (from `h3fusion fuse`)")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, final model, logs)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    data = parser.add_argument_group("data")
    add_data_arguments(data)
    data.add_argument("--max-length", type=int, default=300, help="tokens per example (default: %(default)s)")
    data.add_argument(
        "--template",
        default=None,
        help="prompt template with {instruction} and {input} (default: the tokenizer's chat template, else Alpaca)",
    )
    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda-gate", type=float, default=0.01, help="gating-loss weight (default: %(default)s)")
    loss.add_argument(
        "--gammas",
        type=_floats,
        default=[1e-3],
        help="drift weight per expert, comma separated; one value applies to all (default: 1e-3)",
    )
    loss.add_argument("--squared-drift", action="store_true", help="use the squared norm in the drift term")
    loss.add_argument("--lambda-balance", type=float, default=0.0, help="load-balancing weight (default: off)")
    model = parser.add_argument_group("model")
    model.add_argument("--top-k", type=int, default=None, help="experts per token (default: the model's)")
    model.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="LoRA on the experts with this rank (default: train full expert weights)",
    )
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    add_experts_implementation_argument(model)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=5e-4)
    opt.add_argument("--epochs", type=float, default=3.0)
    opt.add_argument("--max-steps", type=int, default=-1)
    opt.add_argument("--batch-size", type=int, default=4, help="per device")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--bf16", action="store_true")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--logging-steps", type=int, default=10)
    opt.add_argument("--save-steps", type=int, default=500)
    opt.add_argument("--save-total-limit", type=int, default=None)
    opt.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the latest in --out")
    opt.add_argument("--no-cuda", action="store_true", help="train on the CPU even when a GPU is present")
    opt.add_argument("--ddp-backend", default=None, help="e.g. gloo for multi-process CPU runs")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from h3fusion.data import InstructionCollator, InstructionDataset, expert_names_from_config
    from h3fusion.trainers import H3FusionTrainer
    from h3fusion.trainers.checkpoint import publish_staged_dir
    from h3fusion.utils.files import atomic_write_json

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = expert_names_from_config(model.config)
    examples = load_data_arguments(args.data)
    dataset = InstructionDataset(examples, tokenizer, names, max_length=args.max_length, template=args.template)
    gammas = args.gammas * len(names) if len(args.gammas) == 1 else args.gammas
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=[],
        use_cpu=args.no_cuda,
        ddp_backend=args.ddp_backend,
        ddp_find_unused_parameters=False,
        # only when asked: transformers 5.x renames the option (activation_checkpointing) and warns on the old name
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )
    trainer = H3FusionTrainer(
        model,
        targs,
        train_dataset=dataset,
        data_collator=InstructionCollator(tokenizer.pad_token_id),
        lambda_gate=args.lambda_gate,
        gammas=gammas,
        lambda_balance=args.lambda_balance,
        squared_drift=args.squared_drift,
        top_k=args.top_k,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        expert_names=names,
        experts_implementation=args.experts_implementation,
    )
    resume = args.resume
    if resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.out) if os.path.isdir(args.out) else None
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        final_model = trainer.model
        if hasattr(final_model, "merge_and_unload"):
            final_model = final_model.merge_and_unload()
        staged = os.path.join(args.out, ".staging-final")
        final_model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        publish_staged_dir(staged, os.path.join(args.out, "final"))
        with open(os.path.join(args.out, "train_log.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(trainer.state.log_history, f, indent=2)
        os.replace(os.path.join(args.out, "train_log.json.tmp"), os.path.join(args.out, "train_log.json"))
        # the run's settings, with the experts implementation that actually ran the MoE blocks
        run_config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        run_config["experts_implementation"] = trainer.experts_implementation
        atomic_write_json(os.path.join(args.out, "run_config.json"), run_config)
        print(f"final model: {os.path.join(args.out, 'final')}")
    trainer.accelerator.wait_for_everyone()
    return 0
