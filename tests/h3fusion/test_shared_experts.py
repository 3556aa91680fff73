"""Shared-base experts (design.md §10): N LoRA adapters of one base fused as the base FFN kept once plus each
adapter, exactly; full-weight models through a truncated SVD (--delta-rank); the on-disk format, load_fused_model,
training with H3FusionTrainer, and `h3fusion export` to a plain Mixtral."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion import fuse_models, load_fused_model, save_fused_model
from h3fusion.cli import main
from h3fusion.data import InstructionCollator
from h3fusion.models import LoRAExperts
from h3fusion.models.shared_format import SHARED_WEIGHTS, is_shared_dir
from h3fusion.trainers import H3FusionTrainer
from op_counts import count_h3fusion_ops, count_lora_moe_calls
from training_tiny import quiet_training_args
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")

MLP = ["gate_proj", "up_proj", "down_proj"]
# different ranks, alphas, rsLoRA, rank/alpha patterns, and an adapter without gate_proj
ADAPTERS = {
    "helpful": dict(r=4, lora_alpha=16, target_modules=MLP),
    "harmless": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=MLP, alpha_pattern={"up_proj": 3}),
    "honest": dict(r=2, lora_alpha=8, target_modules=["up_proj", "down_proj"], rank_pattern={"down_proj": 1}),
}


def _adapter(base, path, **kw):
    """Save a PEFT LoRA adapter of `base` with random non-zero B."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def base_and_adapters(tmp_path):
    base = build_tiny_llama(layers=2)
    base.save_pretrained(tmp_path / "base")
    dirs = {name: _adapter(base, tmp_path / name, **kw) for name, kw in ADAPTERS.items()}
    return base, dirs


def _same_routers(src, dst):
    with torch.no_grad():
        for a, b in zip(src.model.layers, dst.model.layers, strict=True):
            b.mlp.gate.weight.copy_(a.mlp.gate.weight)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shared_fusion_equals_the_materialised_fusion(base_and_adapters):
    base, dirs = base_and_adapters
    mat = fuse_models(base, dirs, top_k=2, progress=False)
    shared = fuse_models(base, dirs, top_k=2, progress=False, experts="shared")
    _same_routers(mat, shared)
    E, H, F = 3, 32, 64
    R = 16  # harmless: gate 8 + up 8 stacked (block-diagonal B)
    for m, layer in zip(mat.model.layers, shared.model.layers, strict=True):
        experts = layer.mlp.experts
        assert isinstance(experts, LoRAExperts) and experts.shared_base and experts.rank == R
        assert experts.scaling == 1.0  # every adapter's own scaling is folded into its B
        gate_up, down = experts.merged_weights()
        torch.testing.assert_close(gate_up, m.mlp.experts.gate_up_proj, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down, m.mlp.experts.down_proj, rtol=1e-5, atol=1e-6)
        # FFN weight memory: the base once plus the adapters, vs E full FFNs
        numel = sum(p.numel() for p in experts.parameters())
        assert numel == 3 * H * F + E * R * (2 * H + 3 * F)
        assert sum(p.numel() for p in m.mlp.experts.parameters()) == E * 3 * H * F
    ids = torch.randint(0, 128, (3, 11))
    with count_lora_moe_calls() as calls:
        got = _logits(shared, ids)
    assert calls["forward"] == 2
    want = _logits(mat, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - _logits(fuse_models(base, {"b": base, "c": base}, progress=False), ids)).abs().max() > 1e-2
    record = shared.config.h3fusion
    assert record["experts_layout"] == "shared" and record["shared_experts"]["rank"] == R


def test_full_models_are_refused_or_enter_as_truncated_svd(tmp_path, base_and_adapters):
    base, dirs = base_and_adapters
    full = perturbed_copy(base, scale=0.05)
    aligned = {"helpful": dirs["helpful"], "full": full}
    with pytest.raises(ValueError, match=r"expert 'full'.*is a full model, not a LoRA adapter.*delta_rank"):
        fuse_models(base, aligned, top_k=1, progress=False, experts="shared")
    with pytest.raises(ValueError, match="delta_rank applies to experts='shared'"):
        fuse_models(base, aligned, top_k=1, progress=False, delta_rank=2)
    mat = fuse_models(base, aligned, top_k=2, progress=False)
    # full rank: the SVD is exact
    exact = fuse_models(base, aligned, top_k=2, progress=False, experts="shared", delta_rank=32)
    _same_routers(mat, exact)
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(_logits(exact, ids), _logits(mat, ids), rtol=1e-4, atol=1e-5)
    errors = exact.config.h3fusion["shared_experts"]["delta_relative_error"]
    assert set(errors) == {"0", "1"} and set(errors["0"]) == {"full"}  # the adapter is exact, not approximated
    assert all(e < 1e-5 for layer in errors.values() for e in layer["full"].values())
    # rank 2: the best rank-2 approximation of each projection's delta, and its relative error recorded
    low = fuse_models(base, aligned, top_k=2, progress=False, experts="shared", delta_rank=2)
    assert low.model.layers[0].mlp.experts.rank == 8  # helpful: gate 4 + up 4 stacked, > 2
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        for projection, keys in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            delta = torch.cat([full.get_parameter(p + k + ".weight") - base.get_parameter(p + k + ".weight")
                               for k in keys]).detach()  # fmt: skip
            s = torch.linalg.svdvals(delta.double())
            want_error = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
            got_error = low.config.h3fusion["shared_experts"]["delta_relative_error"][str(layer)]["full"][projection]
            assert got_error == pytest.approx(want_error, rel=1e-4) and 0.1 < got_error < 1
            merged = low.model.layers[layer].mlp.experts.merged_weights()[0 if projection == "gate_up_proj" else 1]
            approx = merged[1].double() - torch.cat([base.get_parameter(p + k + ".weight") for k in keys]).detach()
            assert torch.linalg.matrix_rank(approx, atol=1e-4) == 2
            assert float((approx - delta.double()).norm() / delta.double().norm()) == pytest.approx(want_error, 1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_format_round_trip(tmp_path, tied, capsys):
    base = build_tiny_llama(layers=2, tie_word_embeddings=tied)
    dirs = {n: _adapter(base, tmp_path / n, **ADAPTERS[n]) for n in ("helpful", "honest")}
    shared = fuse_models(base, dirs, top_k=1, progress=False, experts="shared")
    out = save_fused_model(shared, tmp_path / "shared")
    assert is_shared_dir(out) and (tmp_path / "shared" / SHARED_WEIGHTS).is_file()
    assert not (tmp_path / "shared" / "model.safetensors").exists()
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert config["h3fusion"]["shared_experts"]["format"] == "h3fusion-shared-experts"
    loaded = load_fused_model(out)
    assert all(isinstance(layer.mlp.experts, LoRAExperts) for layer in loaded.model.layers)
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(shared, ids), rtol=0, atol=0)
    for (n, p), q in zip(shared.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(OSError):  # no model.safetensors: transformers refuses it rather than loading garbage
        AutoModelForCausalLM.from_pretrained(out)
    assert main(["export", str(tmp_path / "helpful"), "--out", str(tmp_path / "x")]) == 2
    assert "helpful is not a shared-base fused model" in capsys.readouterr().err


def test_bad_shared_folders_are_named(tmp_path, base_and_adapters):
    base, dirs = base_and_adapters
    out = save_fused_model(fuse_models(base, dirs, progress=False, experts="shared"), tmp_path / "shared")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "shared" / SHARED_WEIGHTS
    state = load_file(file)
    state.pop("model.layers.1.mlp.experts.down_lora_B")
    save_file(state, file)
    with pytest.raises(ValueError, match=r"shared_experts.safetensors: missing tensors.*down_lora_B"):
        load_fused_model(out)
    file.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shared_experts.safetensors: cannot read"):
        load_fused_model(out)


def _features(n, vocab=128):
    g = torch.Generator().manual_seed(1)
    feats = []
    for i in range(n):
        ids = torch.randint(3 + 40 * (i % 3), 43 + 40 * (i % 3), (8,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100, -100] + ids[2:], "category_labels": i % 3})
    return feats


def test_done_when_three_adapters_trained_exported_load_as_plain_mixtral(tmp_path, base_and_adapters):
    """A shared-base fusion of three adapters, trained a few steps with H3FusionTrainer, exported, loads with plain
    AutoModelForCausalLM.from_pretrained and gives the shared-base model's logits."""
    base, dirs = base_and_adapters
    save_fused_model(fuse_models(base, dirs, top_k=2, progress=False, experts="shared"), tmp_path / "fused")
    model = load_fused_model(tmp_path / "fused")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = quiet_training_args(
        tmp_path, per_device_train_batch_size=4, learning_rate=2e-2, max_steps=3, logging_steps=1
    )
    trainer = H3FusionTrainer(
        model, args, train_dataset=_features(12), data_collator=InstructionCollator(0), lambda_gate=0.5, gammas=0.01
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"model.layers.{i}.mlp.{w}"
        for i in range(2)
        for w in ("gate.weight", *(f"experts.{p}_lora_{x}" for p in ("gate_up", "down") for x in "AB"))
    )
    with count_lora_moe_calls() as calls, count_h3fusion_ops() as counts:
        trainer.train()
    assert calls["forward"] == calls["backward"] == 2 * 3
    assert counts["moe_lora_ffn_forward"] == counts["moe_lora_ffn_backward"] == 2 * 3, dict(counts)
    assert [h for h in trainer.state.log_history if "drift_loss" in h][-1]["drift_loss"] > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # base FFN, attention, norms, embeddings frozen
    trainer.save_model(str(tmp_path / "trained"))  # the shared-base format again
    assert is_shared_dir(tmp_path / "trained")
    assert main(["export", str(tmp_path / "trained"), "--out", str(tmp_path / "plain")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert type(plain).__name__ == "MixtralForCausalLM"
    assert plain.model.layers[0].mlp.experts.gate_up_proj.shape == (3, 128, 32)
    assert plain.config.h3fusion["experts_layout"] == "materialised"
    ids = torch.randint(0, 128, (3, 10))
    torch.testing.assert_close(_logits(plain.eval(), ids), _logits(model.eval(), ids), rtol=1e-5, atol=1e-5)


def test_cli_fuse_shared_train_export(tmp_path, base_and_adapters, capsys):
    from h3fusion.data import InstructionExample, save_instructions
    from training_tiny import word_level_tokenizer

    base, dirs = base_and_adapters
    words = [f"w{i}" for i in range(30)]
    word_level_tokenizer([":", *words]).save_pretrained(tmp_path / "base")
    full = perturbed_copy(base)
    full.save_pretrained(tmp_path / "full")
    argv = ["fuse", "--base", str(tmp_path / "base"), "--expert", f"helpful={dirs['helpful']}", "--expert"]
    argv += [f"full={tmp_path / 'full'}", "--experts", "shared", "--no-progress", "--top-k", "1"]
    assert main([*argv, "--out", str(tmp_path / "f0")]) == 2
    assert "expert 'full'" in capsys.readouterr().err and not (tmp_path / "f0").exists()
    assert main([*argv, "--delta-rank", "3", "--out", str(tmp_path / "fused")]) == 0
    printed = capsys.readouterr().out
    assert "layer 1: relative delta reconstruction error at rank 3: full 0." in printed
    record = json.loads((tmp_path / "fused" / "config.json").read_text())["h3fusion"]
    assert 0 < record["shared_experts"]["delta_relative_error"]["1"]["full"]["down_proj"] < 1
    exs = [InstructionExample(f"w{i} w{i + 1}", "w3 w4", c) for i, c in enumerate(["helpful", "full"] * 4)]
    save_instructions(exs, tmp_path / "data.jsonl")
    argv = ["train", str(tmp_path / "fused"), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run")]
    argv += ["--template", "{instruction} :", "--max-steps", "2", "--batch-size", "4", "--no-cuda"]
    assert main(argv) == 0
    final = tmp_path / "run" / "final"
    assert is_shared_dir(final)
    argv = ["route-report", str(final), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "report")]
    with count_lora_moe_calls() as calls:
        assert main([*argv, "--device", "cpu", "--batch-size", "8", "--template", "{instruction} :"]) == 0
    assert calls["forward"] == 2  # one batch, two layers, on the shared-base LoRA experts
    assert main(["export", str(final), "--out", str(final / "inside")]) == 2  # never into its input
    assert main(["export", str(final), "--out", str(tmp_path / "plain")]) == 0
    assert main(["export", str(final), "--out", str(tmp_path / "plain")]) == 2  # a previous output: --overwrite
    assert "--overwrite" in capsys.readouterr().err and not (final / "inside").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    ids = torch.randint(0, 34, (2, 7))
    torch.testing.assert_close(_logits(plain, ids), _logits(load_fused_model(final), ids), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "plain" / "tokenizer.json").is_file()


def test_large_deltas_take_a_randomized_svd_with_an_exact_error(monkeypatch, base_and_adapters):
    import h3fusion.models.shared_experts as shared_experts

    base, _ = base_and_adapters
    full = perturbed_copy(base, scale=0.05)
    exact = fuse_models(base, {"full": full}, top_k=1, progress=False, experts="shared", delta_rank=2)
    monkeypatch.setattr(shared_experts, "EXACT_SVD_MAX_NUMEL", 0)  # every delta counts as large
    fast = fuse_models(base, {"full": full}, top_k=1, progress=False, experts="shared", delta_rank=2)
    again = fuse_models(base, {"full": full}, top_k=1, progress=False, experts="shared", delta_rank=2)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        ours = fast.config.h3fusion["shared_experts"]["delta_relative_error"][str(layer)]["full"]
        best = exact.config.h3fusion["shared_experts"]["delta_relative_error"][str(layer)]["full"]
        merged = fast.model.layers[layer].mlp.experts.merged_weights()
        for i, (projection, keys) in enumerate(
            (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))
        ):
            w = lambda m, k, p=p: m.get_parameter(f"{p}{k}.weight").detach().double()  # noqa: E731
            delta = torch.cat([w(full, k) - w(base, k) for k in keys])
            kept = merged[i][0].double() - torch.cat([w(base, k) for k in keys])
            assert ours[projection] == pytest.approx(float((delta - kept).norm() / delta.norm()), rel=1e-3)
            assert best[projection] * (1 - 1e-5) <= ours[projection] <= best[projection] * 1.05  # near the optimum
    for a, b in zip(fast.model.layers, again.model.layers, strict=True):  # seeded: reproducible
        for x, y in zip(a.mlp.experts.parameters(), b.mlp.experts.parameters(), strict=True):
            assert torch.equal(x, y)
