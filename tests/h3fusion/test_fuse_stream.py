"""fuse_to_disk: the streamed fusion writes the checkpoint fuse_models + save_fused_model write (tensor for tensor,
config, index), for every option (attention, router inits incl. prototypes, LoRA experts, tied embeddings, dtype),
holding one output tensor at a time; it loads with plain transformers; an interrupted run leaves nothing behind."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion.models.fuse import fuse_models, save_fused_model
from h3fusion.models.fuse_stream import fuse_to_disk
from h3fusion.utils.files import OUTPUT_MARKER, OutputDirError
from pref_tiny import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("helpful", "harmless", "honest")
PROMPTS = {"helpful": ["how is the cat", "answer"], "harmless": ["no bad dog"], "honest": ["why is the mat red"]}


def _write_trio(tmp_path, *, tied=False, lora=False, dtype=torch.float32):
    """Base (with tokenizer) + 3 aligned checkpoints in sharded safetensors; the last one a LoRA adapter if `lora`."""
    tok = tiny_tokenizer()
    base = build_tiny_llama(vocab_size=len(tok), layers=3, tie_word_embeddings=tied).to(dtype)
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    tok.save_pretrained(tmp_path / "base")
    dirs = {}
    for name in NAMES:
        dirs[name] = str(tmp_path / name)
        if lora and name == "honest":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["up_proj", "down_proj"], init_lora_weights=False)
            get_peft_model(copy.deepcopy(base), cfg).save_pretrained(dirs[name])
        else:
            perturbed_copy(base, mlp_only=False).save_pretrained(dirs[name], max_shard_size="30KB")
    return str(tmp_path / "base"), dirs


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                for k in h.keys():
                    assert k not in out, f"{k} saved twice"
                    out[k] = h.get_tensor(k)
    return out


def _assert_same_checkpoint(a, b):
    files_a, files_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert files_a == files_b
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for name in ("config.json", "generation_config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    if "model.safetensors.index.json" in files_a:  # the same shards as save_pretrained's, the same index
        ia, ib = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (a, b))
        assert ia == ib
        from safetensors import safe_open

        for key, file in ib["weight_map"].items():
            with safe_open(os.path.join(b, file), "pt") as h:
                assert key in h.keys()
    return ta


CASES = [
    dict(attention="base", router_init="random"),
    dict(attention="mean", router_init="zeros", tied=True),
    dict(attention="base", router_init="prototypes", lora=True),
    dict(attention="mean", router_init="random", lora=True, dtype=torch.bfloat16),
    dict(attention="base", router_init="prototypes", out_dtype=torch.bfloat16, shard="1GB"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c.values()))
def test_stream_writes_the_in_memory_checkpoint(tmp_path, case):
    case = dict(case)
    base, dirs = _write_trio(tmp_path, tied=case.pop("tied", False), lora=case.pop("lora", False),
                             dtype=case.pop("dtype", torch.float32))  # fmt: skip
    shard = case.pop("shard", "20KB")
    opts = dict(top_k=2, dtype=case.pop("out_dtype", None), progress=False, **case)
    if case["router_init"] == "prototypes":
        opts["prototype_prompts"] = PROMPTS
    torch.manual_seed(7)
    model = fuse_models(base, dirs, **opts)
    save_fused_model(model, tmp_path / "mem", base=base, max_shard_size=shard)
    torch.manual_seed(7)
    out = fuse_to_disk(base, dirs, tmp_path / "stream", max_shard_size=shard, **opts)
    assert out == str(tmp_path / "stream")
    tensors = _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert (tmp_path / "stream" / OUTPUT_MARKER).is_file() and (tmp_path / "stream" / "tokenizer.json").is_file()
    sharded = shard != "1GB"
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file() == sharded
    assert (tmp_path / "stream" / "model.safetensors").is_file() == (not sharded)
    # the experts really are the aligned models' MLPs, each its own (defect (a)) and the routers as asked
    w1 = [tensors[f"model.layers.2.block_sparse_moe.experts.{e}.w1.weight"] for e in range(3)]
    assert not torch.equal(w1[0], w1[1]) and not torch.equal(w1[1], w1[2])
    gate = tensors["model.layers.1.block_sparse_moe.gate.weight"]
    if opts["router_init"] == "prototypes":
        torch.testing.assert_close(gate.float().norm(dim=1), torch.ones(3), rtol=1e-2, atol=1e-2)
    elif opts["router_init"] == "zeros":
        assert gate.abs().max() == 0
    cfg = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg["h3fusion"]["experts"] == list(NAMES) and cfg["h3fusion"]["router_init"] == opts["router_init"]


def test_stream_output_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, dirs = _write_trio(tmp_path, dtype=torch.bfloat16)
    torch.manual_seed(3)
    fused = fuse_models(base, dirs, progress=False)
    save_fused_model(fused, tmp_path / "mem", base=base, max_shard_size="40KB")
    torch.manual_seed(3)
    fuse_to_disk(base, dirs, tmp_path / "stream", max_shard_size="40KB", progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    assert type(streamed).__name__ == "MixtralForCausalLM" and streamed.dtype == torch.bfloat16
    ids = torch.randint(3, streamed.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
        # and the fused model in memory computes what its checkpoint does (RoPE stays fp32 in a bf16 model)
        assert fused.model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(fused(ids).logits, streamed(ids).logits)
    # expert 1 of layer 0 is aligned model "harmless"'s MLP, in the model transformers loads
    aligned = AutoModelForCausalLM.from_pretrained(dirs["harmless"])
    F = streamed.config.intermediate_size
    up = streamed.model.layers[0].mlp.experts.gate_up_proj[1, F:]
    assert torch.equal(up, aligned.model.layers[0].mlp.up_proj.weight)
    tok = AutoTokenizer.from_pretrained(tmp_path / "stream")
    gen = streamed.generate(**tok("the cat", return_tensors="pt"), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == len(tok("the cat")["input_ids"]) + 3


def test_stream_holds_one_output_tensor_at_a_time(tmp_path, monkeypatch):
    """Each output tensor is freed before the next is built, and no fused model is ever allocated off the meta
    device; the sources are read through safe_open, never loaded whole."""
    import safetensors.torch
    import transformers
    from h3fusion.models import fuse_stream

    base, dirs = _write_trio(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("a whole model / file was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    real_init = transformers.MixtralForCausalLM.__init__

    def meta_only_init(self, config):
        assert torch.empty(0).device.type == "meta", "the fused model was built with real memory"
        real_init(self, config)

    monkeypatch.setattr(transformers.MixtralForCausalLM, "__init__", meta_only_init)
    alive: list[weakref.ref] = []
    produced = []
    real_producer = fuse_stream._producer

    def watching_producer(inputs, routers, specs, bar):
        produce = real_producer(inputs, routers, specs, bar)

        def watched(key):
            assert all(r() is None for r in alive), f"an earlier output tensor is still alive when {key} is built"
            value = produce(key)
            if "block_sparse_moe.gate" not in key:  # the routers are precomputed (N x H per layer)
                alive.append(weakref.ref(value))
            produced.append(key)
            return value

        return watched

    monkeypatch.setattr(fuse_stream, "_producer", watching_producer)
    fuse_to_disk(base, dirs, tmp_path / "out", max_shard_size="20KB", progress=False)
    assert len(produced) == len(set(produced)) == len(_tensors(tmp_path / "out"))
    assert len(alive) > 20


def test_interrupted_stream_leaves_nothing_and_keeps_the_previous_output(tmp_path, monkeypatch):
    from h3fusion.models import fuse_stream

    base, dirs = _write_trio(tmp_path)
    calls = {"n": 0}
    real = fuse_stream.expert_weight

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fuse_stream, "expert_weight", failing)
    with pytest.raises(KeyboardInterrupt):
        fuse_to_disk(base, dirs, tmp_path / "out", max_shard_size="20KB", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "a staging folder was left behind"
    monkeypatch.setattr(fuse_stream, "expert_weight", real)
    fuse_to_disk(base, dirs, tmp_path / "out", top_k=1, progress=False)
    before = _tensors(tmp_path / "out")
    calls["n"] = 0
    monkeypatch.setattr(fuse_stream, "expert_weight", failing)
    with pytest.raises(KeyboardInterrupt):
        fuse_to_disk(base, dirs, tmp_path / "out", overwrite=True, progress=False)
    after = _tensors(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_stream_output_folder_rules(tmp_path):
    base, dirs = _write_trio(tmp_path)
    with pytest.raises(OutputDirError, match="overlaps the input"):
        fuse_to_disk(base, dirs, tmp_path / "base" / "fused", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not written by h3fusion"):
        fuse_to_disk(base, dirs, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    fuse_to_disk(base, dirs, tmp_path / "out", progress=False)
    with pytest.raises(OutputDirError, match="--overwrite"):
        fuse_to_disk(base, dirs, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="top_k must be in"):
        fuse_to_disk(base, dirs, tmp_path / "other", top_k=4, progress=False)
    assert not (tmp_path / "other").exists()


def test_cli_fuse_streams_the_in_memory_checkpoint(tmp_path):
    """`h3fusion fuse --seed` writes what fuse_models + save_fused_model write under the same seed."""
    base, dirs = _write_trio(tmp_path, lora=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'python')}")
    experts = [a for n in NAMES for a in ("--expert", f"{n}={dirs[n]}")]
    cmd = [sys.executable, "-m", "h3fusion", "fuse", "--base", base, "--seed", "5", "--max-shard-size", "25KB",
           "--no-progress", "--out", str(tmp_path / "cli"), *experts]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fused 3 experts (helpful, harmless, honest) x 3 layers, top-2" in proc.stdout
    torch.manual_seed(5)
    save_fused_model(fuse_models(base, dirs, progress=False), tmp_path / "mem", base=base, max_shard_size="25KB")
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "cli")


def test_streamed_prototype_rows_equal_the_loaded_base(tmp_path, monkeypatch):
    """Prototype rows from the base streamed layer by layer = from the base loaded whole in fp32 (the old path)."""
    import transformers
    from h3fusion.models.checkpoint_io import CheckpointWeights
    from h3fusion.models.prototypes import prototype_rows

    base, _ = _write_trio(tmp_path, dtype=torch.bfloat16)
    src = CheckpointWeights(base)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = tiny_tokenizer()
    want = prototype_rows(loaded, src, list(NAMES), PROMPTS, tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    got = prototype_rows(base, src, list(NAMES), PROMPTS)  # the tokenizer comes from the base folder
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3, 32) and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[0], got[1])


def test_stream_from_loaded_models(tmp_path):
    """Models already in memory (no checkpoint folders) stream too, to the same checkpoint."""
    import h3fusion

    base = build_tiny_llama(layers=2, tie_word_embeddings=True)
    aligned = {n: perturbed_copy(base) for n in NAMES[:2]}
    torch.manual_seed(1)
    save_fused_model(fuse_models(base, aligned, top_k=1, progress=False), tmp_path / "mem", max_shard_size="10KB")
    torch.manual_seed(1)
    h3fusion.fuse_to_disk(base, aligned, tmp_path / "stream", top_k=1, max_shard_size="10KB", progress=False)
    tensors = _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert "lm_head.weight" not in tensors  # tied: saved once, as the embedding
    want = aligned["harmless"].model.layers[1].mlp.up_proj.weight
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.1.w3.weight"], want)


def test_saved_layout_without_transformers_revert(monkeypatch):
    """Where transformers has no `revert_weight_conversion`, the saved layout is built by hand: the same tensors."""
    import transformers.core_model_loading as core
    from h3fusion.models.fuse import prepare_fusion
    from h3fusion.models.fuse_stream import _meta_model, fused_tensor_specs

    base = build_tiny_llama(layers=2)
    inputs = prepare_fusion(
        base, {n: base for n in NAMES}, top_k=2, attention="base", router_init="zeros", prototype_prompts=None,
        dtype=torch.bfloat16, allow_non_mlp_adapter=False,
    )  # fmt: skip
    want, want_storage = fused_tensor_specs(_meta_model(inputs))
    monkeypatch.delattr(core, "revert_weight_conversion")
    got, got_storage = fused_tensor_specs(_meta_model(inputs))
    assert got == want  # same names, shapes and dtypes (dict equality ignores the order)
    assert got_storage.keys() == want_storage.keys() and len(got) == 3 + 2 * (3 * 3 + 7)  # embed, norm, lm_head
    assert all(spec.dtype == torch.bfloat16 for spec in got.values())
