"""`h3fusion train FUSED_DIR --data [CATEGORY=]FILE ... --out DIR`: H3Fusion training of a fused model.

Runs unchanged under `torchrun --nproc_per_node N -m h3fusion train ...` or `accelerate launch -m h3fusion train
...` (it is a `transformers.Trainer`). The final model is written to `<out>/final` as a plain Hugging Face
checkpoint (LoRA experts merged), loadable with `AutoModelForCausalLM.from_pretrained`; with `--lora-rank` the
adapter is also written to `<out>/adapter` in PEFT's format. A shared-base model (`h3fusion fuse --experts shared`)
trains its routers and expert adapters and stays shared-base in `<out>/final` (`h3fusion export` makes it plain).
"""

from __future__ import annotations

import argparse

from .common import (
    add_data_arguments,
    add_device_argument,
    add_experts_implementation_argument,
    add_overwrite_argument,
    comma_floats,
    int_or_minus_one,
    load_data_arguments,
    load_pretrained,
    model_path,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    prompt_template,
    resolve_device,
)

HELP = "train a fused MoE's routers and experts with the LM, gating and drift losses (H3Fusion)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    parser.add_argument("model", type=model_path, help="fused model directory (from `h3fusion fuse`)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (checkpoints, final model, logs): new, empty, or a previous `h3fusion train` output with "
        "--resume or --overwrite",
    )
    add_overwrite_argument(parser)
    parser.add_argument("--tokenizer", type=model_path, default=None, help="tokenizer directory (default: the model)")
    data = parser.add_argument_group("data")
    add_data_arguments(data)
    data.add_argument("--max-length", type=positive_int, default=300, help="tokens per example (default: %(default)s)")
    data.add_argument(
        "--template",
        type=prompt_template,
        default=None,
        help="prompt template with {instruction} and {input} (default: the tokenizer's chat template, else Alpaca)",
    )
    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda-gate", type=nonneg_float, default=0.01, help="gating-loss weight (default: 0.01)")
    loss.add_argument(
        "--gammas",
        type=comma_floats,
        default=[1e-3],
        help="drift weight per expert, comma separated; one value applies to all (default: 1e-3)",
    )
    loss.add_argument("--squared-drift", action="store_true", help="use the squared norm in the drift term")
    loss.add_argument("--lambda-balance", type=nonneg_float, default=0.0, help="load-balancing weight (default: off)")
    model = parser.add_argument_group("model")
    model.add_argument("--top-k", type=positive_int, default=None, help="experts per token (default: the model's)")
    model.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help="LoRA on the experts with this rank (default: train full expert weights)",
    )
    model.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default: 2 x rank)")
    add_experts_implementation_argument(model)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=positive_float, default=5e-4)
    opt.add_argument("--epochs", type=positive_float, default=3.0)
    opt.add_argument("--max-steps", type=int_or_minus_one, default=-1, help="stop after N steps (-1: use --epochs)")
    opt.add_argument("--batch-size", type=positive_int, default=4, help="per device")
    opt.add_argument("--grad-accum", type=positive_int, default=1)
    opt.add_argument("--warmup-steps", type=nonneg_int, default=0)
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--bf16", action="store_true")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--logging-steps", type=positive_int, default=10)
    opt.add_argument("--save-steps", type=positive_int, default=500)
    opt.add_argument("--save-total-limit", type=positive_int, default=None)
    opt.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the latest in --out")
    add_device_argument(opt, indexed=False)
    opt.add_argument("--ddp-backend", default=None, help="e.g. gloo for multi-process CPU runs")


def _resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from (None: start fresh), validated so a corrupted file is named before training."""
    import os

    from h3fusion.trainers.checkpoint import check_checkpoint_dir

    resume = args.resume
    if resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.out) if os.path.isdir(args.out) else None
    if resume is not None:
        check_checkpoint_dir(resume, "--resume")
    return resume


def run(args: argparse.Namespace) -> int:
    """Check flags, data, --resume checkpoint and --out; then train while holding the lock on --out."""
    from h3fusion.utils.files import check_output_dir, claim_output_dir

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other (resume continues --out, overwrite empties it)")
    inputs = [args.model, args.tokenizer, *(p for _, p in args.data)]
    check_output_dir(args.out, overwrite=args.overwrite, resume=args.resume is not None, inputs=inputs)
    examples = load_data_arguments(args.data)
    if not examples:
        raise ValueError(f"--data: the files {[p for _, p in args.data]} hold no examples")
    resume = _resume_checkpoint(args)
    device = resolve_device(args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.data import InstructionDataset, expert_names_from_config
    from h3fusion.models.shared_format import is_shared_dir, load_fused_model

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if is_shared_dir(args.model):  # shared-base experts (design.md §11): adapters and routers train
        model = load_fused_model(args.model, dtype=dtype)
    else:
        model = load_pretrained(AutoModelForCausalLM, args.model, "model", dtype=dtype)
    tokenizer = load_pretrained(AutoTokenizer, args.tokenizer or args.model, "--tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = expert_names_from_config(model.config)
    if len(args.gammas) not in (1, len(names)):
        raise ValueError(f"--gammas: {len(args.gammas)} values for {len(names)} experts ({', '.join(names)})")
    dataset = InstructionDataset(examples, tokenizer, names, max_length=args.max_length, template=args.template)
    gammas = args.gammas * len(names) if len(args.gammas) == 1 else args.gammas
    with claim_output_dir(args.out, kind="train", overwrite=args.overwrite, resume=args.resume is not None,
                          inputs=inputs):  # fmt: skip
        _train(args, model, tokenizer, dataset, names, gammas, resume, device)
    return 0


def _train(args, model, tokenizer, dataset, names, gammas, resume, device) -> None:
    """Build the H3FusionTrainer, train, and publish <out>/final and <out>/train_log.json (main process)."""
    import os

    from transformers import TrainingArguments

    from h3fusion.data import InstructionCollator
    from h3fusion.trainers import H3FusionTrainer
    from h3fusion.utils.files import atomic_write_json

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
        use_cpu=device == "cpu",
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
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        _publish_final(trainer.model, tokenizer, args)
        atomic_write_json(os.path.join(args.out, "train_log.json"), trainer.state.log_history)
        # the run's settings, with the experts implementation that actually ran the MoE blocks
        run_config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        run_config["experts_implementation"] = trainer.experts_implementation
        atomic_write_json(os.path.join(args.out, "run_config.json"), run_config)
        print(f"final model: {os.path.join(args.out, 'final')}")
    trainer.accelerator.wait_for_everyone()


def _publish_final(model, tokenizer, args) -> None:
    """<out>/final: the trained model with LoRA experts merged (a plain checkpoint), or in the shared-base format
    when it has a shared base; with LoRA experts also <out>/adapter, the adapter in PEFT's format."""
    import os

    from h3fusion.models.lora_adapter_io import save_lora_adapter
    from h3fusion.models.lora_experts import lora_experts_modules, merge_lora_experts
    from h3fusion.models.shared_format import is_shared_model, write_shared_model
    from h3fusion.trainers.checkpoint import publish_staged_dir, staging_dir_for

    def publish(name, write):
        staged = staging_dir_for(args.out, name)
        os.makedirs(staged, exist_ok=True)
        write(staged)
        tokenizer.save_pretrained(staged)
        publish_staged_dir(staged, os.path.join(args.out, name))

    if is_shared_model(model):
        publish("final", lambda d: write_shared_model(model, d))
        return
    if lora_experts_modules(model):
        publish("adapter", lambda d: save_lora_adapter(model, d, base_model_name_or_path=os.path.abspath(args.model)))
        model = merge_lora_experts(model)
    elif hasattr(model, "merge_and_unload"):  # PEFT (transformers' experts implementations)
        publish("adapter", model.save_pretrained)
        model = model.merge_and_unload()
    publish("final", model.save_pretrained)
