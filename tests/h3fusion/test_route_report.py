"""route-report: routing accuracy per category (vs a per-example recomputation), usage heatmaps, files, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from h3fusion.data import InstructionExample, save_instructions
from h3fusion.losses import mean_router_probs
from h3fusion.route_report import route_report
from training_tiny import EXPERT_NAMES, tiny_mixtral_config, word_level_tokenizer
from transformers import MixtralForCausalLM

WORDS = [f"w{i}" for i in range(30)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra OpenMP threads only spin-wait


def tokenizer():
    return word_level_tokenizer([":", *WORDS])


def model():
    cfg = tiny_mixtral_config(layers=3, h3fusion={"experts": EXPERT_NAMES})
    m = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)  # confident, varied routing
    return m


def examples(n):
    out = []
    for _ in range(n):
        cat = random.choice(EXPERT_NAMES)
        out.append(
            InstructionExample(
                " ".join(random.choices(WORDS, k=random.randint(1, 6))),
                " ".join(random.choices(WORDS, k=random.randint(1, 4))),
                cat,
            )
        )
    return out


def test_accuracy_and_usage_match_per_example_recomputation(tmp_path):
    m, tok, exs = model(), tokenizer(), examples(20)
    stats = route_report(m, exs, tok, tmp_path, template="{instruction} :", batch_size=7)
    correct = {c: [] for c in EXPERT_NAMES}
    for ex in exs:
        ids = tok(f"{ex.instruction} :")["input_ids"] + tok(ex.output)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            out = m(input_ids=torch.tensor([ids]), output_router_logits=True)
        pred = int(mean_router_probs(out.router_logits, torch.ones(1, len(ids))).argmax())
        correct[ex.category].append(pred == EXPERT_NAMES.index(ex.category))
    for cat, hits in correct.items():
        if hits:
            assert abs(stats["accuracy"][cat] - sum(hits) / len(hits)) < 1e-9, cat
            assert stats["counts"][cat] == len(hits)
    assert abs(stats["overall_accuracy"] - sum(sum(h) for h in correct.values()) / len(exs)) < 1e-9
    for cat in stats["categories"]:
        usage = torch.tensor(stats["usage"][cat])
        assert usage.shape == (3, 3)
        torch.testing.assert_close(usage.sum(-1), torch.full((3,), 2.0, dtype=usage.dtype))  # top-2
        assert (usage <= 1).all()
    saved = json.loads((tmp_path / "route_report.json").read_text())
    assert saved["accuracy"] == stats["accuracy"]
    assert (tmp_path / "route_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_route_report(tmp_path, capsys):
    from h3fusion.cli import main

    m, tok = model(), tokenizer()
    m.save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    exs = examples(12)
    save_instructions([e for e in exs if e.category != "honest"], tmp_path / "a.jsonl")
    records = [{"instruction": e.instruction, "output": e.output} for e in exs if e.category == "honest"]
    (tmp_path / "b.json").write_text(json.dumps(records))
    out = tmp_path / "report"
    rc = main(
        [
            "route-report",
            str(tmp_path / "fused"),
            "--data",
            str(tmp_path / "a.jsonl"),
            "--data",
            f"honest={tmp_path / 'b.json'}",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    stats = json.loads((out / "route_report.json").read_text())
    assert sum(stats["counts"].values()) == len(exs)
    assert (out / "route_report.png").exists()
    assert "overall" in capsys.readouterr().out


def test_no_examples_gives_standard_json_and_bad_batch_size_is_refused(tmp_path, capsys):
    m, tok = model(), tokenizer()
    stats = route_report(m, [], tok, tmp_path, template="{instruction} :")
    assert stats["overall_accuracy"] != stats["overall_accuracy"]  # NaN in memory ...

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    saved = json.loads((tmp_path / "route_report.json").read_text(), parse_constant=refuse)
    assert saved["overall_accuracy"] is None  # ... null on disk, never a bare NaN
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -3"):
        route_report(m, examples(3), tok, tmp_path, batch_size=-3)

    from h3fusion.cli import main

    m.save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    (tmp_path / "empty.jsonl").write_text("\n")
    argv = ["route-report", str(tmp_path / "fused"), "--data", f"helpful={tmp_path / 'empty.jsonl'}", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert "hold no examples" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--batch-size", "-3"])
    assert exc.value.code == 2 and "--batch-size: expected a positive integer, got -3" in capsys.readouterr().err
