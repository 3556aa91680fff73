"""Tiny offline model + tokenizer factories for the preference-fusion tests (no downloads)."""

from __future__ import annotations

import random

import torch
from fusion_tiny import tiny_llama_config

_WORDS = "the a cat dog sat ran on mat red blue big small is was good bad yes no why how answer question".split()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in milliseconds on a fixed word list, with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(_WORDS)] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2):
    """A randomly initialised LlamaForCausalLM small enough for a few CPU training steps."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(vocab_size, hidden, layers, intermediate=2 * hidden)).float()


def random_text(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def random_records(n_prompts: int, sources=("alpha", "beta", "target"), per_source: int = 2, seed=None):
    """Multi-source records {prompt, responses: [{text, source, reward}]} with random texts and rewards (drawn from
    torch's generator, which the suite seeds, unless `seed` is given)."""
    rng = random.Random(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    records = []
    for i in range(n_prompts):
        responses = [
            {"text": random_text(rng), "source": s, "reward": round(rng.uniform(-2.0, 2.0), 4)}
            for s in sources
            for _ in range(per_source)
        ]
        records.append({"prompt": f"question {i}: " + random_text(rng), "responses": responses})
    return records


def pref_training_args(tmp_path, max_steps: int, logging_steps: int = 1, **overrides):
    """TrainingArguments for the preference trainers' CPU runs: batch 4, lr 5e-3 constant, no saving, and the
    suite's seed of this test (tests/conftest.py), so two trainers of one test shuffle alike."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=max_steps,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=logging_steps,
        save_strategy="no",
        disable_tqdm=True,
        seed=torch.initial_seed() % 2**31,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
