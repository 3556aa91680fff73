"""One preference-training run for the sharded-training tests; launched as a script by torchrun (or plainly).

Writes <out>/losses.json (the logged loss of every step, rank 0) and <out>/final.safetensors (the full final
parameters, gathered under FSDP2). Everything is built from fixed seeds, so every run sees the same model and data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]  # tests/h3fusion: pref_tiny, fusion_tiny


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", choices=["sft", "dpo", "h3fusion"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    parser.add_argument("--stop-after", type=int, default=0, help="end the run after step N (an interruption)")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    a = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from h3fusion.data.preference import build_pairs, sft_examples
    from pref_tiny import random_records, tiny_llama, tiny_tokenizer
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    tok = tiny_tokenizer()
    torch.manual_seed(a.seed)
    model = tiny_llama(len(tok), hidden=16)
    records = random_records(8, seed=a.seed)
    # plain SGD: parameters are linear in the gradients, so fp32 noise stays at noise level (Adam turns noise in a
    # near-zero gradient entry into a full lr-sized step) and a wrong loss scale (accumulation, ranks) shows
    kwargs = dict(
        output_dir=os.path.join(a.out, "run"), use_cpu=True, report_to="none", per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.ga, max_steps=a.steps, learning_rate=0.2 if a.optim == "sgd" else 0.01,
        optim=a.optim, lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True, seed=a.seed,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
    )  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["ddp_backend"] = "gloo"
    if a.fsdp:
        layer = "MixtralDecoderLayer" if a.trainer == "h3fusion" else "LlamaDecoderLayer"
        kwargs.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layer]})
    args = TrainingArguments(**kwargs)
    if a.trainer == "sft":
        from h3fusion.trainers.fuse_sft import FuseSFTTrainer

        data = sft_examples(records, top_k=2, temperature=0.5)[:16]
        trainer = FuseSFTTrainer(model, args, data, None, tok, max_length=20, max_prompt_length=10)
    elif a.trainer == "h3fusion":
        from h3fusion.data.instructions import InstructionCollator
        from h3fusion.trainers.h3fusion_trainer import H3FusionTrainer
        from training_tiny import tiny_fused

        torch.manual_seed(a.seed)
        model = tiny_fused()
        g = torch.Generator().manual_seed(a.seed)
        data = []
        for i in range(16):  # equal lengths: a per-rank token mean then equals the global one
            ids = (torch.randint(0, 10, (6,), generator=g) + 10 * (i % 3) + 1).tolist()
            data.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]], "category_labels": i % 3})
        trainer = H3FusionTrainer(
            model, args, train_dataset=data, data_collator=InstructionCollator(0), lambda_gate=0.5,
            gammas=[0.05, 0.1, 0.2],
        )  # fmt: skip
    else:
        from h3fusion.trainers.fuse_po import FusePOTrainer

        data = build_pairs(records, mode="per_source")[:16]
        ref = tiny_llama(len(tok), hidden=16)
        trainer = FusePOTrainer(model, ref, args, data, None, tok, loss="dpo", beta=0.5)
    if a.stop_after:
        from transformers import TrainerCallback

        class StopAfter(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= a.stop_after:
                    control.should_training_stop = True  # the step's checkpoint is still saved

        trainer.add_callback(StopAfter())
    trainer.train(resume_from_checkpoint=a.resume)
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
        with open(os.path.join(a.out, "losses.json"), "w") as f:
            json.dump(losses, f)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(a.out, "final.safetensors"))


if __name__ == "__main__":
    try:
        main()
    finally:
        # a gloo rank that exits with its process group alive can abort at interpreter shutdown ("terminate called
        # without an active exception") after all its work is done; leave the group first
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    from dist_tiny import exit_without_shutdown  # from this script's folder, which Python puts on sys.path

    exit_without_shutdown()
