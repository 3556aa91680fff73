"""`h3fusion fuse` from the command line on directories the test writes: full checkpoints + a LoRA adapter,
prototype routers from a JSON prompt file, and the result loads with plain transformers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion.cli import main
from pref_tiny import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_inputs(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    base = build_tiny_llama(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    helpful, harmless = perturbed_copy(base), perturbed_copy(base)
    helpful.save_pretrained(tmp_path / "helpful")
    harmless.save_pretrained(tmp_path / "harmless")
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=8, target_modules=["up_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    lora.save_pretrained(tmp_path / "honest")
    return base, helpful, lora.merge_and_unload()


def test_cli_fuse_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, helpful, honest = _write_inputs(tmp_path)
    prompts = {"helpful": ["how is the cat"], "harmless": ["no bad dog"], "honest": ["why is the mat red"]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "fused"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'python')}")
    cmd = [
        sys.executable, "-m", "h3fusion", "fuse", "--base", str(tmp_path / "base"),
        "--expert", f"helpful={tmp_path / 'helpful'}", "--expert", f"harmless={tmp_path / 'harmless'}",
        "--expert", f"honest={tmp_path / 'honest'}", "--top-k", "2", "--attention", "base",
        "--router-init", "prototypes", "--prototype-prompts", str(tmp_path / "prompts.json"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fused 3 experts (helpful, harmless, honest)" in proc.stdout

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.h3fusion["experts"] == ["helpful", "harmless", "honest"]
    assert model.config.h3fusion["router_init"] == "prototypes"
    ex = model.model.layers[1].mlp.experts
    F = model.config.intermediate_size
    torch.testing.assert_close(ex.down_proj[0], helpful.model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(ex.gate_up_proj[2, F:], honest.model.layers[1].mlp.up_proj.weight, rtol=1e-5, atol=1e-6)
    norms = model.model.layers[0].mlp.gate.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3), rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(**tok("the cat", return_tensors="pt"), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == len(tok("the cat")["input_ids"]) + 3


def test_cli_refusals(tmp_path, capsys):
    build_tiny_llama().save_pretrained(tmp_path / "base")
    build_tiny_llama(hidden=48).save_pretrained(tmp_path / "wide")
    argv = ["fuse", "--base", str(tmp_path / "base"), "--expert", f"a={tmp_path / 'wide'}", "--top-k", "1"]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert "differs from the base in hidden_size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    two = ["--expert", f"a={tmp_path / 'base'}", "--expert", f"a={tmp_path / 'base'}"]
    assert main(["fuse", "--base", str(tmp_path / "base"), *two, "--out", str(tmp_path / "o")]) == 2
    assert "duplicate expert names" in capsys.readouterr().err


def _fuse_argv(tmp_path, *extra, experts=("a", "b")):
    argv = ["fuse", "--base", str(tmp_path / "base"), "--top-k", "1", "--no-progress", "--out", str(tmp_path / "o")]
    for name in experts:
        argv += ["--expert", f"{name}={tmp_path / name}"]
    return argv + list(extra)


def _two_experts(tmp_path):
    tok = tiny_tokenizer()
    base = build_tiny_llama(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    perturbed_copy(base).save_pretrained(tmp_path / "a")
    perturbed_copy(base).save_pretrained(tmp_path / "b")
    return base


def test_cli_corrupted_or_missing_inputs_are_named(tmp_path, capsys):
    _two_experts(tmp_path)
    weights = tmp_path / "b" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated: the header promises more than the file holds
    assert main(_fuse_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{weights}: cannot read this safetensors file" in err and "Traceback" not in err
    weights.write_bytes(b"\x00" * 64)
    assert main(_fuse_argv(tmp_path)) == 2
    assert str(weights) in capsys.readouterr().err
    assert main(_fuse_argv(tmp_path, experts=("a", "missing"))) == 2
    assert f"the folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_prototype_prompts_shape_is_checked(tmp_path, capsys):
    _two_experts(tmp_path)
    prompts = tmp_path / "prompts.json"
    proto = ["--router-init", "prototypes", "--prototype-prompts", str(prompts)]
    prompts.write_text(json.dumps({"a": "how is the cat", "b": ["no bad dog"]}))  # a string, not a list
    assert main(_fuse_argv(tmp_path, *proto)) == 2
    err = capsys.readouterr().err
    assert str(prompts) in err and "key 'a' must be a list of prompts, got str" in err
    prompts.write_text('{"a": ["x"], "b": ["y"],')
    assert main(_fuse_argv(tmp_path, *proto)) == 2
    assert f"--prototype-prompts: {prompts} is not valid JSON" in capsys.readouterr().err
    prompts.write_text(json.dumps(["a", "b"]))
    assert main(_fuse_argv(tmp_path, *proto)) == 2
    assert "expected an object" in capsys.readouterr().err
    prompts.write_text(json.dumps({"a": ["x"], "b": [], "c": ["z"]}))
    assert main(_fuse_argv(tmp_path, *proto)) == 2
    assert "['c'] are not expert names" in capsys.readouterr().err
    prompts.write_text(json.dumps({"a": ["x"], "b": []}))
    assert main(_fuse_argv(tmp_path, *proto)) == 2
    assert "key 'b' has no prompts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_attention_only_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = _two_experts(tmp_path)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "attn")
    argv = _fuse_argv(tmp_path, experts=("a", "attn"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expert 'attn'" in err and "changes no MLP weight" in err and "--allow-non-mlp-adapter" in err
    assert main([*argv, "--allow-non-mlp-adapter"]) == 0
    err = capsys.readouterr().err
    assert "warning: expert 'attn'" in err and "model.layers.0.self_attn.q_proj" in err
