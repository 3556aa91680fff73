"""Tiny offline models for the fusion tests: Llama models with random weights and perturbed aligned copies.

(The offline tokenizer is `pref_tiny.tiny_tokenizer`.)
"""

from __future__ import annotations

import copy

import torch


def tiny_llama_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2, intermediate: int = 64, **overrides):
    """The LlamaConfig of the tiny test models: 4 heads, 2 KV heads, untied embeddings, pad/bos/eos = 0/1/2."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, intermediate: int = 64, **overrides):
    """A randomly initialised fp32 LlamaForCausalLM (4 heads, 2 KV heads) small enough for CPU tests."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(vocab_size, hidden, layers, intermediate, **overrides)).float().eval()


def perturbed_copy(model, scale: float = 0.05, mlp_only: bool = True):
    """A deep copy of `model` whose MLP weights (and, with mlp_only=False, every weight) get fresh random noise."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if not mlp_only or ".mlp." in name:
                p.add_(torch.randn_like(p) * scale)
    return out
