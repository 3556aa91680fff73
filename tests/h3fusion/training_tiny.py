"""Tiny offline setup for the H3Fusion training tests: Mixtral configs and fused models, word-level tokenizers,
and instruction features whose category is learnable from any token (no downloads)."""

from __future__ import annotations

import torch

EXPERT_NAMES = ["helpful", "harmless", "honest"]


def tiny_mixtral_config(
    vocab_size: int = 40,
    hidden: int = 16,
    intermediate: int = 24,
    layers: int = 2,
    experts: int = 3,
    max_positions: int = 64,
    **overrides,
):
    """A MixtralConfig small enough for CPU tests: 2 heads, 1 KV head, top-2 routing (overridable)."""
    from transformers import MixtralConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=max_positions,
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def tiny_fused(names=EXPERT_NAMES):
    """A randomly initialised tiny fused model: one expert per name, the names in `config.h3fusion_expert_names`."""
    from transformers import MixtralForCausalLM

    cfg = tiny_mixtral_config(experts=len(names))
    cfg.h3fusion_expert_names = list(names)
    return MixtralForCausalLM(cfg)


def separable_features(n: int, max_len: int = 8):
    """n features cycling through categories 0, 1, 2; category c uses tokens 10c+1 .. 10c+10 only (routing is
    learnable from any token). Lengths 4 .. max_len; the first two tokens are masked out of the labels."""
    feats = []
    for i in range(n):
        c = i % 3
        ids = (torch.randint(0, 10, (int(torch.randint(4, max_len + 1, ())),)) + 10 * c + 1).tolist()
        feats.append({"input_ids": ids, "labels": [-100, -100] + ids[2:], "category_labels": c})
    return feats


def word_level_tokenizer(words):
    """A whitespace word-level tokenizer: <pad> = 0, <eos> = 1, <unk> = 2, then `words` in order (repeats skipped)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def quiet_training_args(tmp_path, **kw):
    """transformers.TrainingArguments for a tiny CPU run in `tmp_path/out`: no saving, no reports, no progress bar,
    and the suite's seed (tests/conftest.py), so a failure replays with H3FUSION_TEST_SEED. `kw` overrides/extends."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=int(torch.initial_seed() % 2**31),
    )
    return TrainingArguments(**{**base, **kw})
