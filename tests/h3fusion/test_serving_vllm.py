"""The fused checkpoint is a standard Mixtral: vLLM loads it and generates what transformers generates (greedy).

Runs only where vllm is importable (it is not installed in this repository's CI; the test says so when skipped).
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm to run the serving test)")


def _fused_checkpoint(path):
    from training_tiny import EXPERT_NAMES, tiny_mixtral_config, word_level_tokenizer
    from transformers import MixtralForCausalLM

    words = [f"w{i}" for i in range(60)]
    tok = word_level_tokenizer(words)
    # head_dim 64 and widths that every vLLM attention backend accepts; still a few MB
    cfg = tiny_mixtral_config(
        vocab_size=len(tok), hidden=128, intermediate=64, max_positions=128, h3fusion={"experts": EXPERT_NAMES}
    )
    cfg.head_dim = 64
    cfg.initializer_range = 0.3  # decisive logits: greedy argmax is not a near-tie between the two engines
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_vllm_loads_fused_checkpoint_and_generates_like_transformers(tmp_path):
    model, tok = _fused_checkpoint(tmp_path / "fused")
    prompt = "w1 w2 w3 w4"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]

    llm = vllm.LLM(
        model=str(tmp_path / "fused"), dtype="float32", enforce_eager=True, max_model_len=64,
        gpu_memory_utilization=0.2, seed=0,
    )  # fmt: skip
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": ids[0].tolist()}, params)
    got = list(out[0].outputs[0].token_ids)
    assert len(got) == 6
    assert got == want.tolist()
