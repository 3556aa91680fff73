"""Fixtures for the fusion tests: tiny Llama models with random weights and an offline tokenizer (no downloads)."""

from __future__ import annotations

import pytest
from fusion_tiny import build_tiny_llama, perturbed_copy


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(**kwargs) -> LlamaForCausalLM (see build_tiny_llama)."""
    return build_tiny_llama


@pytest.fixture
def aligned_copy():
    """Factory: aligned_copy(model, scale=0.05, mlp_only=True) -> a perturbed deep copy."""
    return perturbed_copy


@pytest.fixture
def tiny_tok():
    """A tiny byte-level BPE tokenizer (<pad>=0, <s>=1, </s>=2), trained offline in milliseconds."""
    from pref_tiny import tiny_tokenizer

    return tiny_tokenizer()
