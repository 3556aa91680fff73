"""fuse_models on loaded models: experts = each aligned model's MLP, forced routing reproduces each aligned model,
attention base/mean, router inits, config record, save -> plain from_pretrained -> same logits, generate."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion.models.fuse import fuse_models, save_fused_model
from pref_tiny import tiny_tokenizer

NAMES = ("helpful", "harmless", "honest")


def _force_expert(model, i: int):
    """Route every token of every layer to expert i with weight 1 (the fused model must then be aligned model i)."""

    def forward(h):
        h = h.reshape(-1, h.shape[-1])
        logits = torch.full((h.shape[0], model.config.num_local_experts), -10.0)
        logits[:, i] = 10.0
        return logits, torch.ones(h.shape[0], 1), torch.full((h.shape[0], 1), i, dtype=torch.long)

    for layer in model.model.layers:
        layer.mlp.gate.forward = forward


@pytest.fixture
def trio():
    base = build_tiny_llama(layers=3)
    return base, {n: perturbed_copy(base) for n in NAMES}


def test_each_expert_is_its_own_aligned_mlp(trio):
    base, aligned = trio
    fused = fuse_models(base, aligned, top_k=2, progress=False)
    assert type(fused).__name__ == "MixtralForCausalLM"
    assert fused.config.num_local_experts == 3 and fused.config.num_experts_per_tok == 2
    for layer_idx, layer in enumerate(fused.model.layers):
        ex = layer.mlp.experts
        F = fused.config.intermediate_size
        for i, name in enumerate(NAMES):
            mlp = aligned[name].model.layers[layer_idx].mlp
            assert torch.equal(ex.gate_up_proj[i, :F], mlp.gate_proj.weight)
            assert torch.equal(ex.gate_up_proj[i, F:], mlp.up_proj.weight)
            assert torch.equal(ex.down_proj[i], mlp.down_proj.weight)
        # defect (a): experts must not all be the same tensor
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.equal(ex.gate_up_proj[i], ex.gate_up_proj[j])
                assert not torch.equal(ex.down_proj[i], ex.down_proj[j])
        assert torch.equal(layer.self_attn.q_proj.weight, base.model.layers[layer_idx].self_attn.q_proj.weight)
    assert torch.equal(fused.lm_head.weight, base.lm_head.weight)
    assert torch.equal(fused.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert fused.config.h3fusion["experts"] == list(NAMES)
    assert set(fused.config.h3fusion["sources"]) == set(NAMES)


def test_forced_routing_reproduces_each_aligned_model(trio):
    base, aligned = trio
    fused = fuse_models(base, aligned, top_k=1, router_init="zeros", progress=False)
    ids = torch.randint(3, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            _force_expert(fused, i)
            want = aligned[name](ids).logits
            got = fused(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # and it is not accidentally equal to another expert's model
            other = aligned[NAMES[(i + 1) % 3]](ids).logits
            assert (got - other).abs().max() > 1e-4


def test_attention_mean_and_router_inits():
    base = build_tiny_llama()
    aligned = {n: perturbed_copy(base, mlp_only=False) for n in NAMES[:2]}
    fused = fuse_models(base, aligned, top_k=1, attention="mean", router_init="zeros", progress=False)
    for key in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"):
        want = (aligned["helpful"].state_dict()[key] + aligned["harmless"].state_dict()[key]) / 2
        torch.testing.assert_close(fused.state_dict()[key], want)
        assert not torch.equal(fused.state_dict()[key], base.state_dict()[key])
    assert all(layer.mlp.gate.weight.abs().max() == 0 for layer in fused.model.layers)
    rnd = fuse_models(base, aligned, top_k=2, router_init="random", progress=False)
    w = torch.stack([layer.mlp.gate.weight for layer in rnd.model.layers])
    assert w.abs().max() > 0
    assert 0.5 * base.config.initializer_range < w.std() < 2 * base.config.initializer_range


def test_prototype_router_rows_are_normalised_category_means():
    tiny_tok = tiny_tokenizer()
    base = build_tiny_llama(vocab_size=len(tiny_tok))
    aligned = {n: perturbed_copy(base) for n in NAMES[:2]}
    prompts = {"helpful": ["how is the cat", "answer the question"], "harmless": ["no bad dog", "is it good"]}
    fused = fuse_models(
        base, aligned, router_init="prototypes", prototype_prompts=prompts, tokenizer=tiny_tok, progress=False
    )
    captured = {}
    layer = base.model.layers[1]
    handle = layer.mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("h", []).append(a[0][0]))
    with torch.no_grad():
        for p in prompts["harmless"]:
            base(torch.tensor([tiny_tok(p)["input_ids"]]))
    handle.remove()
    want = torch.nn.functional.normalize(torch.cat(captured["h"]).mean(0), dim=0)
    row = fused.model.layers[1].mlp.gate.weight[1]
    torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-6)
    assert abs(fused.model.layers[0].mlp.gate.weight[0].norm().item() - 1.0) < 1e-5


def test_save_load_with_plain_transformers_and_generate(tmp_path):
    tiny_tok = tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_llama(vocab_size=len(tiny_tok))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    aligned = {n: perturbed_copy(base) for n in NAMES}
    fused = fuse_models(str(base_dir), aligned, top_k=2, progress=False)
    out = save_fused_model(fused, tmp_path / "fused", base=str(base_dir), max_shard_size="50KB")
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files  # sharded past max_shard_size
    assert not any(f.endswith(".py") for f in files)  # no remote code
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mixtral" and cfg["h3fusion"]["experts"] == list(NAMES)
    assert cfg["h3fusion"]["base"] == os.path.abspath(base_dir)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    ids = torch.randint(3, base.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fused(ids).logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == tiny_tok.get_vocab()
    enc = tok("the cat sat", return_tensors="pt")
    gen = loaded.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 5)


def test_refusals_name_the_first_difference(tmp_path):
    base = build_tiny_llama(layers=2)
    good = perturbed_copy(base)
    cases = [
        (build_tiny_llama(hidden=48, layers=2), "hidden_size"),
        (build_tiny_llama(vocab_size=130, layers=2), "vocab_size"),
        (build_tiny_llama(layers=3), "num_hidden_layers"),
        (build_tiny_llama(layers=2, intermediate=80), "intermediate_size"),
    ]
    for other, field in cases:
        with pytest.raises(ValueError, match=rf"aligned model 'bad' differs from the base in {field}"):
            fuse_models(base, {"ok": good, "bad": other}, top_k=1, progress=False)

    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(
        MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(ValueError, match="differs from the base in model_type: base 'llama', 'bad' 'mistral'"):
        fuse_models(base, {"bad": mistral}, top_k=1, progress=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    with pytest.raises(ValueError, match="base model_type 'gpt2' is not supported"):
        fuse_models(gpt2, {"a": gpt2}, top_k=1, progress=False)
    biased = build_tiny_llama(layers=2, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        fuse_models(biased, {"a": biased}, top_k=1, progress=False)
    with pytest.raises(ValueError, match="top_k must be in"):
        fuse_models(base, {"a": good}, top_k=2, progress=False)
    with pytest.raises(ValueError, match="attention must be one of"):
        fuse_models(base, {"a": good}, top_k=1, attention="max", progress=False)
    with pytest.raises(ValueError, match="router_init must be one of"):
        fuse_models(base, {"a": good}, top_k=1, router_init="ones", progress=False)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        fuse_models(base, {"a": good, "b": good}, router_init="prototypes", prototype_prompts={"a": [[5, 6]]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        fuse_models(base, {}, progress=False)
    with pytest.raises(ValueError, match="nope does not exist"):
        fuse_models(base, {"a": str(tmp_path / "nope")}, top_k=1, progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        fuse_models(base, {"a": str(tmp_path)}, top_k=1, progress=False)
    (tmp_path / "bin").mkdir()
    base.config.save_pretrained(tmp_path / "bin")
    torch.save(base.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors checkpoints"):
        fuse_models(base, {"a": str(tmp_path / "bin")}, top_k=1, progress=False)


def test_checkpoint_dirs_stream_layer_by_layer(tmp_path, monkeypatch, capsys):
    """Sharded safetensors dirs fuse to exactly what the loaded models give, without loading any full model."""
    import safetensors.torch
    import transformers
    from h3fusion.models.checkpoint_io import CheckpointWeights

    base = build_tiny_llama(layers=3, tie_word_embeddings=True)
    aligned = {n: perturbed_copy(base) for n in NAMES}
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    for n, m in aligned.items():
        m.save_pretrained(tmp_path / n, max_shard_size="40KB")
    assert (tmp_path / "honest" / "model.safetensors.index.json").exists()
    want = fuse_models(base, aligned, router_init="zeros", progress=False)

    def refuse(*a, **k):
        raise AssertionError("a whole model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    reads = []  # (checkpoint folder, tensor name) in read order
    original_get = CheckpointWeights.get

    def counting_get(self, key):
        reads.append((os.path.basename(str(self.path)), key))
        return original_get(self, key)

    monkeypatch.setattr(CheckpointWeights, "get", counting_get)
    got = fuse_models(str(tmp_path / "base"), {n: str(tmp_path / n) for n in NAMES}, router_init="zeros", progress=True)
    assert "fusing layers" in capsys.readouterr().err  # the progress bar
    # streamed: each tensor read once, layer after layer (never back to an earlier layer), each layer's experts read
    # from their own checkpoints (3 MLP tensors per expert per layer)
    assert len(reads) == len(set(reads)), "a tensor was read twice"
    layer_of = [int(key.split("layers.")[1].split(".")[0]) for _, key in reads if "layers." in key]
    assert layer_of == sorted(layer_of) and set(layer_of) == {0, 1, 2}
    for layer in range(3):
        for n in NAMES:
            mlp = [k for src, k in reads if src == n and f"layers.{layer}.mlp." in k]
            assert len(mlp) == 3, (layer, n, mlp)
    sd_want, sd_got = want.state_dict(), got.state_dict()
    assert sd_want.keys() == sd_got.keys()
    for key in sd_want:
        assert torch.equal(sd_got[key], sd_want[key]), key
    assert got.config.tie_word_embeddings and got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    assert got.config.h3fusion["sources"]["honest"] == str(tmp_path / "honest")


def test_mistral_base_and_bf16_checkpoint(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=6, rope_theta=5000.0,
    )  # fmt: skip
    base = MistralForCausalLM(cfg).eval()
    aligned = {n: perturbed_copy(base) for n in NAMES[:2]}
    aligned["harmless"].to(torch.bfloat16).save_pretrained(tmp_path / "h")
    fused = fuse_models(base, {"helpful": aligned["helpful"], "harmless": str(tmp_path / "h")}, top_k=1)
    assert fused.config.sliding_window == 6 and fused.dtype == torch.float32
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        _force_expert(fused, 0)
        torch.testing.assert_close(fused(ids).logits, aligned["helpful"](ids).logits, rtol=1e-5, atol=1e-5)
    from h3fusion.models.checkpoint_io import CheckpointWeights

    assert CheckpointWeights(tmp_path / "h").dtype() == torch.bfloat16
    want = aligned["harmless"].model.layers[1].mlp.up_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(fused.model.layers[1].mlp.experts.gate_up_proj[1, 64:], want)
