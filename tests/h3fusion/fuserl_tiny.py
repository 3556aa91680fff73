"""Tiny offline source models, reward models and prompt files for the FuseRL pipeline tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fusion_tiny import tiny_llama_config
from pref_tiny import tiny_tokenizer

# a plain template: "user : hi assistant :" (the generation prompt) / "... assistant : reply " (the reward model's)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def _tokenizer(chat_template: bool = True):
    tok = tiny_tokenizer()
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_source_model(folder: Path, seed: int, *, chat_template: bool = True, always_eos: bool = False) -> str:
    """Save a random tiny LlamaForCausalLM + tokenizer (with the chat template) into `folder`; returns the path.

    always_eos: a model whose next token is always EOS (zero attention / MLP outputs leave the residual stream at
    a constant embedding, and only the EOS row of lm_head responds to it): its responses are empty.
    """
    from transformers import LlamaForCausalLM

    tok = _tokenizer(chat_template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), 32, 2, 64)).float()
    if always_eos:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight")):
                    p.zero_()
            model.model.embed_tokens.weight.fill_(1.0)
            model.lm_head.weight[tok.eos_token_id] = 1.0
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_reward_model(
    folder: Path,
    seed: int = 0,
    *,
    num_labels: int = 1,
    head: bool = True,
    chat_template: bool = True,
    remote_code: bool = False,
) -> str:
    """Save a tiny reward model: LlamaForSequenceClassification (num_labels outputs) + tokenizer.

    head=False saves a plain LlamaForCausalLM instead (a checkpoint without a scoring head).
    remote_code=True marks the config as needing its own code (auto_map).
    """
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tok = _tokenizer(chat_template)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tok), 32, 2, 64, num_labels=num_labels)
    model = (LlamaForSequenceClassification if head else LlamaForCausalLM)(config).float()
    if head:
        with torch.no_grad():  # a larger head so rewards spread over a useful range
            model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if remote_code:
        cfg_path = Path(folder) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomRM"}
        cfg_path.write_text(json.dumps(cfg))
    return str(folder)


WORDS = "the cat sat on the mat why is the dog red how big was a blue cat".split()


def write_prompts(path: Path, n: int, *, messages_every: int = 0) -> Path:
    """n prompts; every `messages_every`-th one (if > 0) as a two-turn chat `messages` prompt."""
    lines = []
    for i in range(n):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 3)) + " ?"
        if messages_every and i % messages_every == 0:
            lines.append({"messages": [{"role": "system", "content": "be good"}, {"role": "user", "content": text}]})
        else:
            lines.append({"prompt": text})
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


DEMO_CONFIG = """\
out: run
prompts: prompts.jsonl
sources: {alpha: models/alpha, beta: models/beta, target: models/target}
target: models/target
device: cpu
sample: {n: 3, temperature: 1.0, top_p: 0.95, max_new_tokens: 8, seed: 0, batch_size: 12}
score: {reward_model: models/rm, batch_size: 16}
build: {sft_ratio: 0.4, seed: 0, top_k: 3, mode: per_source, gap_min: 0.01, gap_max: 0.5}
fuse_sft: {max_steps: 4, lr: 5.0e-3, batch_size: 4, max_length: 64, logging_steps: 1}
fuse_po: {loss: dpo, beta: 0.5, max_steps: 4, lr: 5.0e-3, batch_size: 2, max_length: 64, logging_steps: 1}
"""


def make_demo(folder: Path) -> Path:
    """Three tiny source models, a tiny reward model, 12 prompts and a pipeline.yaml in `folder` (for a manual
    `h3fusion fuserl --config FOLDER/pipeline.yaml`); returns the config path."""
    folder = Path(folder)
    for i, name in enumerate(["alpha", "beta", "target"]):
        make_source_model(folder / "models" / name, 100 + i)
    make_reward_model(folder / "models" / "rm", 7)
    write_prompts(folder / "prompts.jsonl", 12, messages_every=5)
    config = folder / "pipeline.yaml"
    config.write_text(DEMO_CONFIG)
    return config


if __name__ == "__main__":  # PYTHONPATH=.:python:tests/h3fusion python tests/h3fusion/fuserl_tiny.py DIR
    import sys

    print(make_demo(Path(sys.argv[1])))
