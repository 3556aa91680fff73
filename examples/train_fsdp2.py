"""FuseSFT on a fused model under FSDP2: `accelerate launch --config_file examples/accelerate_fsdp2.yaml
examples/train_fsdp2.py FUSED_DIR DATA.jsonl OUT_DIR` (DATA: one SFT item {prompt, response, weight} per line)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from h3fusion.trainers.fuse_sft import FuseSFTTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    fused, data_path, out = sys.argv[1:4]
    with open(data_path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(fused)
    model = AutoModelForCausalLM.from_pretrained(fused, experts_implementation="h3fusion")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=1, report_to="none")
    FuseSFTTrainer(model, args, data, None, tok, max_length=512).train()


if __name__ == "__main__":
    main()
