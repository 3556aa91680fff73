"""`h3fusion sample`: seeded sampling, resume after a crash, chat templates, prompt validation, empty responses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fuserl_tiny import make_source_model, read_jsonl, write_prompts
from h3fusion.cli import main
from h3fusion.fuserl.sampling import EmptyGenerationError, SampleSettings, SeededSampler, sample_to_file
from h3fusion.utils.files import OutputDirError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"alpha": make_source_model(root / "alpha", 1), "beta": make_source_model(root / "beta", 2)}


def _settings(**kw):
    base = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7, batch_size=4, backend="hf")
    return SampleSettings(**{**base, **kw})


# ---- the sampler itself ------------------------------------------------------------------------------------------


def test_seeded_sampler_draws_from_the_tempered_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    temperature, top_p, rows = 0.7, 0.8, 6000
    sampler = SeededSampler(list(range(rows)), 3, temperature, top_p, 0, [4])
    out = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, 5))
    assert torch.all((out == 0).sum(-1) == 1) and torch.all(torch.isinf(out).sum(-1) == 4)
    tokens = out.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, 0)
    before = probs.cumsum(0) - probs
    nucleus = probs * (before < top_p)
    expected = nucleus / nucleus.sum()
    freq = torch.bincount(tokens, minlength=5).double() / rows
    assert torch.all(freq[nucleus == 0] == 0)  # never outside the nucleus
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_seeded_sampler_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 50)
    a = SeededSampler([11, 12, 13, 14], 2, 1.0, 1.0, 0, [])(torch.zeros(4, 2, dtype=torch.long), logits)
    b = SeededSampler([13], 2, 1.0, 1.0, 0, [])(torch.zeros(1, 2, dtype=torch.long), logits[2:3])
    assert torch.equal(a[2:3].argmax(-1), b.argmax(-1))


def test_seeded_sampler_greedy_and_min_new_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    ids = torch.zeros(2, 4, dtype=torch.long)
    greedy = SeededSampler([1, 2], 4, 0.0, 1.0, 0, [])(ids, logits)
    assert greedy.argmax(-1).tolist() == [1, 0]
    masked = SeededSampler([1, 2], 4, 0.0, 1.0, 1, [1])(ids, logits)  # EOS (1) forbidden at the first new token
    assert masked.argmax(-1).tolist() == [2, 0]
    later = SeededSampler([1, 2], 3, 0.0, 1.0, 1, [1])(ids, logits)  # one new token already: EOS allowed
    assert later.argmax(-1).tolist() == [1, 0]


# ---- files, resume ------------------------------------------------------------------------------------------------


def test_sample_records_and_settings(sources, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3, messages_every=2)
    out = tmp_path / "samples.jsonl"
    summary = sample_to_file(sources, prompts, out, _settings())
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [0, 1, 2]
    assert "messages" in records[0] and "messages" not in records[1]
    assert records[0]["prompt"] == records[0]["messages"][-1]["content"]
    for rec in records:
        assert [(r["source"], r["sample"]) for r in rec["responses"]] == [
            ("alpha", 0),
            ("alpha", 1),
            ("beta", 0),
            ("beta", 1),
        ]
        assert all(r["text"].strip() and 1 <= r["new_tokens"] <= 6 for r in rec["responses"])
        assert len({r["seed"] for r in rec["responses"]}) == 4
    texts = [r["text"] for rec in records for r in rec["responses"]]
    assert len(set(texts)) > len(texts) // 2  # it samples, it does not repeat one answer
    meta = json.loads((tmp_path / "samples.jsonl.meta.json").read_text())
    assert meta["status"] == "complete" and meta["settings"]["generation"]["temperature"] == 1.0
    assert meta["summary"]["per_source"]["alpha"]["responses"] == 6 and summary["prompts"] == 3
    assert not (tmp_path / "samples.jsonl.work").exists()
    # the same command again: complete, nothing to do; other settings: refused, then replaced with overwrite
    assert sample_to_file(sources, prompts, out, _settings())["skipped"] is True
    with pytest.raises(OutputDirError, match="temperature"):
        sample_to_file(sources, prompts, out, _settings(temperature=0.5))
    sample_to_file(sources, prompts, out, _settings(temperature=0.5), overwrite=True)
    assert read_jsonl(out) != records


def test_killed_run_resumes_to_the_same_records(sources, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    full = tmp_path / "full.jsonl"
    sample_to_file(sources, prompts, full, _settings())

    class Killed(Exception):
        pass

    def kill(source, done, total):
        if source == "beta" and done == 3:
            raise Killed

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        sample_to_file(sources, prompts, out, _settings(), progress=kill)
    assert not out.exists()  # nothing presented as complete
    part = tmp_path / "resumed.jsonl.work" / "beta.jsonl"
    assert len(read_jsonl(part)) == 3 and len(read_jsonl(tmp_path / "resumed.jsonl.work" / "alpha.jsonl")) == 5
    with open(part, "a") as f:
        f.write('{"id": 3, "responses": [{"source": "beta", "te')  # a crash in the middle of an append
    # resumed with another batch size: the records do not depend on the batches
    sample_to_file(sources, prompts, out, _settings(batch_size=3))
    assert read_jsonl(out) == read_jsonl(full)


def test_checkpoint_generation_defaults_do_not_leak_in(sources, tmp_path):
    """A checkpoint's own generation_config (sampling, repetition penalty, ...) must not change our responses."""
    import shutil

    from transformers import GenerationConfig

    custom = tmp_path / "custom"
    shutil.copytree(sources["alpha"], custom)
    GenerationConfig(do_sample=True, temperature=0.05, top_k=2, repetition_penalty=50.0, no_repeat_ngram_size=1,
                     min_new_tokens=6, eos_token_id=2, pad_token_id=0).save_pretrained(custom)  # fmt: skip
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    sample_to_file({"alpha": sources["alpha"]}, prompts, tmp_path / "a.jsonl", _settings())
    sample_to_file({"alpha": str(custom)}, prompts, tmp_path / "b.jsonl", _settings())
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


# ---- errors -------------------------------------------------------------------------------------------------------


def test_source_without_chat_template(tmp_path):
    plain = make_source_model(tmp_path / "plain", 3, chat_template=False)
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(ValueError, match=r"source model 'plain' \(.*plain\) has no chat template"):
        sample_to_file({"plain": plain}, prompts, tmp_path / "o.jsonl", _settings())
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.work").exists()  # checked before writing


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"text": "hi"}', r"p\.jsonl:2: needs a string 'prompt' or a 'messages' list"),
        ('{"prompt": "  "}', r"p\.jsonl:2: 'prompt' is empty"),
        ('{"messages": [{"role": "user"}]}', r"p\.jsonl:2: messages\[0\] must be an object"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "last of 'messages' must be a user turn"),
        ("{not json", r"p\.jsonl:2: invalid JSON"),
    ],
)
def test_malformed_prompts(line, match, sources, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        sample_to_file(sources, prompts, tmp_path / "o.jsonl", _settings())


def test_empty_generations(tmp_path):
    mute = make_source_model(tmp_path / "mute", 4, always_eos=True)
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(EmptyGenerationError, match=r"source model 'mute' generated an empty response for prompt 0"):
        sample_to_file({"mute": mute}, prompts, tmp_path / "o.jsonl", _settings(min_new_tokens=0))
    assert not (tmp_path / "o.jsonl").exists()
    summary = sample_to_file(
        {"mute": mute}, prompts, tmp_path / "o.jsonl", _settings(min_new_tokens=0, on_empty="drop")
    )
    assert summary["dropped_empty"] == {"mute": 4}
    assert [r["responses"] for r in read_jsonl(tmp_path / "o.jsonl")] == [[], []]
    # min_new_tokens=1 forbids the immediate EOS: one token, then EOS
    sample_to_file({"mute": mute}, prompts, tmp_path / "o2.jsonl", _settings(on_empty="drop"))
    kept = [r for rec in read_jsonl(tmp_path / "o2.jsonl") for r in rec["responses"]]
    assert kept and all(r["new_tokens"] == 1 and r["finish"] == "stop" for r in kept)


def test_sample_cli(sources, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "s.jsonl"
    args = [
        "sample",
        "--model",
        f"alpha={sources['alpha']}",
        "--prompts",
        str(prompts),
        "--n",
        "2",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.9",
        "--backend",
        "hf",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 2
    assert math.isclose(
        json.loads((tmp_path / "s.jsonl.meta.json").read_text())["summary"]["generation"]["temperature"], 0.9
    )
    assert main([*args, "--temperature", "0.5"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", "no-equals-sign", "--prompts", str(prompts), "--out", str(out)])
