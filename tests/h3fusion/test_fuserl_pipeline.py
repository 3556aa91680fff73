"""`h3fusion fuserl`: the whole pipeline on tiny models, its skip / resume / rerun rules, its report, config errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml  # PyYAML: a dependency of huggingface_hub, so always there with transformers
from fuserl_tiny import make_reward_model, make_source_model, read_jsonl, write_prompts
from h3fusion.cli import main
from h3fusion.fuserl.config import load_config
from h3fusion.fuserl.pipeline import run_pipeline
from h3fusion.fuserl.sampling import sample_to_file
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "alpha": make_source_model(root / "alpha", 11),
        "beta": make_source_model(root / "beta", 12),
        "target": make_source_model(root / "target", 13),
        "rm": make_reward_model(root / "rm", 14),
    }


def _config(tmp_path, models, **changes):
    cfg = {
        "out": "run",
        "prompts": "prompts.jsonl",
        "sources": {"alpha": models["alpha"], "beta": models["beta"], "target": models["target"]},
        "target": models["target"],
        "device": "cpu",
        "sample": {
            "n": 2,
            "temperature": 1.0,
            "top_p": 0.95,
            "max_new_tokens": 5,
            "seed": 3,
            "batch_size": 8,
            "backend": "hf",
        },
        "score": {"reward_model": models["rm"], "batch_size": 8},
        "build": {"sft_ratio": 0.34, "seed": 1, "top_k": 2, "gap_min": 0.0},
        "fuse_sft": {"max_steps": 1, "lr": 5e-3, "batch_size": 4, "max_length": 64, "logging_steps": 1},
        "fuse_po": {
            "loss": "dpo",
            "beta": 0.5,
            "max_steps": 2,
            "lr": 5e-3,
            "batch_size": 2,
            "max_length": 64,
            "logging_steps": 1,
        },
    }
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section] = {**cfg[section], sub: value}
        else:
            cfg[section] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _statuses(run_dir):
    return {s["name"]: s["status"] for s in json.loads((run_dir / "report.json").read_text())["stages"]}


@pytest.mark.slow
def test_pipeline_end_to_end_resume_skip_and_rerun(models, tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 6, messages_every=4)
    config = _config(tmp_path, models)
    run_dir = tmp_path / "run"

    # 1. killed during sampling (after 2 prompts of the second source), then resumed by the same command
    class Killed(Exception):
        pass

    def kill(source, done, total):
        if source == "beta" and done == 2:
            raise Killed

    with pytest.raises(Killed):
        run_pipeline(load_config(config), on_sample=kill)
    state = json.loads((run_dir / "sample" / "stage.json").read_text())
    assert state["status"] == "running" and not (run_dir / "sample" / "samples.jsonl").exists()
    assert main(["fuserl", "--config", str(config)]) == 0
    assert _statuses(run_dir) == {
        "sample": "resumed",
        "score": "ran",
        "build": "ran",
        "fuse_sft": "ran",
        "fuse_po": "ran",
    }
    # the resumed samples equal an uninterrupted run's, record for record
    cfg = load_config(config)
    sample_to_file(cfg.sources, cfg.prompts, tmp_path / "uninterrupted.jsonl", cfg.sample)
    assert read_jsonl(run_dir / "sample" / "samples.jsonl") == read_jsonl(tmp_path / "uninterrupted.jsonl")

    # what the run produced
    scored = read_jsonl(run_dir / "score" / "scored.jsonl")
    assert len(scored) == 6 and all(len(r["responses"]) == 6 for r in scored)
    stats = json.loads((run_dir / "build" / "stats.json").read_text())
    assert stats["sft_records"] == 2 and stats["po_records"] == 4
    assert stats["po_items"] + stats["skipped_po_records"] >= 4 and stats["po_items"] > 0
    target = load_file(f"{models['target']}/model.safetensors")
    final = load_file(run_dir / "fuse_po" / "train" / "model" / "model.safetensors")
    assert any(not torch.equal(target[k], final[k]) for k in target)
    sft_log = json.loads((run_dir / "fuse_sft" / "train" / "train_log.json").read_text())
    po_log = json.loads((run_dir / "fuse_po" / "train" / "train_log.json").read_text())
    assert sft_log["steps"] == 1 and po_log["steps"] == 2 and po_log["loss"] == "dpo"
    assert sft_log["items"] == sum(
        min(2, len(r["responses"])) for r in read_jsonl(run_dir / "build" / "sft_records.jsonl")
    )
    assert po_log["items"] == stats["po_items"]  # the trainer trained on the pairs build-data counted
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final_model"] == str(run_dir / "fuse_po" / "train" / "model")
    assert set(report["data"]["score"]["rewards"]) == {"alpha", "beta", "target"}
    md = (run_dir / "report.md").read_text()
    assert "| fuse_po | ran |" in md and "![rewards](rewards.png)" in md and "training_curves.png" in md
    assert (run_dir / "rewards.png").stat().st_size > 1000 and (run_dir / "training_curves.png").stat().st_size > 1000
    capsys.readouterr()

    # 2. the same command again: every stage complete for the same inputs, nothing runs
    before = (run_dir / "fuse_po" / "train" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["fuserl", "--config", str(config)]) == 0
    assert set(_statuses(run_dir).values()) == {"skipped"}
    assert (run_dir / "fuse_po" / "train" / "model" / "model.safetensors").stat().st_mtime_ns == before

    # 3. a scoring setting changes: scoring and everything after it rerun, sampling does not
    samples_mtime = (run_dir / "sample" / "samples.jsonl").stat().st_mtime_ns
    config = _config(tmp_path, models, score__max_length=40)
    assert main(["fuserl", "--config", str(config)]) == 0
    assert _statuses(run_dir) == {
        "sample": "skipped",
        "score": "ran",
        "build": "ran",
        "fuse_sft": "ran",
        "fuse_po": "ran",
    }
    assert (run_dir / "sample" / "samples.jsonl").stat().st_mtime_ns == samples_mtime

    # 4. only the last stage's settings change: only it reruns; batch sizes of sampling / scoring are not settings
    config = _config(tmp_path, models, score__max_length=40, fuse_po__beta=0.2, sample__batch_size=3)
    assert main(["fuserl", "--config", str(config)]) == 0
    assert _statuses(run_dir) == {
        "sample": "skipped",
        "score": "skipped",
        "build": "skipped",
        "fuse_sft": "skipped",
        "fuse_po": "ran",
    }


def test_pipeline_wrpo_without_sft(models, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    config = _config(
        tmp_path,
        models,
        fuse_sft=False,
        build={"sft_ratio": 0.0, "target_source": "target"},
        fuse_po={"loss": "wrpo", "max_steps": 1, "lr": 5e-3, "batch_size": 2, "max_length": 64},
        sample__max_new_tokens=3,
    )
    report = run_pipeline(load_config(config))
    assert [s["name"] for s in report["stages"]] == ["sample", "score", "build", "fuse_po"]
    stats = json.loads((tmp_path / "run" / "build" / "stats.json").read_text())
    assert stats["po_mode"] == "wrpo" and stats["po_items"] >= 1
    assert stats["po_items"] + stats["skipped_po_records"] == 4
    assert all("target_chosen" in t for t in read_jsonl(tmp_path / "run" / "build" / "po_items.jsonl"))
    assert json.loads((tmp_path / "run" / "fuse_po" / "train" / "train_log.json").read_text())["loss"] == "wrpo"


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"fuse_sft__top_k": 3}, r"fuse_sft\.top_k is set under build:"),
        ({"fuse_po__loss": "nope"}, r"fuse_po: argument --loss: invalid choice: 'nope'"),
        ({"fuse_po__warp": 1}, r"fuse_po\.warp is not a flag of h3fusion fuse-po"),
        ({"sample__temprature": 1.0}, r"sample: unknown key\(s\) \['temprature'\]"),
        ({"sample__top_p": 0.0}, r"sample: top_p must be in \(0, 1\]"),
        ({"build__mode": "global", "fuse_po__loss": "rloo"}, "does not fit fuse_po.loss 'rloo'"),
        ({"fuse_po__loss": "wrpo"}, "needs build.target_source"),
        ({"score": {"batch_size": 2}}, "'score' must be a mapping with 'reward_model'"),
        ({"sources": {"bad name": "x"}}, "source name 'bad name'"),
        ({"build__sft_ratio": 0.0}, r"build\.sft_ratio is 0: no prompts for FuseSFT; set fuse_sft: false"),
        ({"build__sft_ratio": 1.0}, r"build\.sft_ratio is 1: no prompts for FusePO; set fuse_po: false"),
    ],
)
def test_config_errors(changes, match, models, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, models, **changes))


def test_config_error_exit_status(models, tmp_path, capsys):
    config = _config(tmp_path, models, fuse_sft__top_k=3)
    assert main(["fuserl", "--config", str(config)]) == 2
    assert "fuse_sft.top_k" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_eval_step_calls_h3fusion_eval_on_the_trained_and_the_initial_model(models, tmp_path, monkeypatch):
    """The optional eval step's glue (h3fusion eval itself is tested in its own suite): its command line and results."""
    import h3fusion.cli
    from h3fusion.fuserl.pipeline import _evaluate

    (tmp_path / "tqa.jsonl").write_text("{}\n")
    config = _config(tmp_path, models, eval={"suite": ["honest", "helpful"], "truthfulqa": "tqa.jsonl", "limit": 2})
    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = tmp_path / "stage" / "eval"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"fuserl": {"truthfulqa_mc1": 0.5}}))
        return 0

    monkeypatch.setattr(h3fusion.cli, "main", fake_main)
    results = _evaluate(load_config(config), "/models/final", "cpu", tmp_path / "stage")
    assert results == {"fuserl": {"truthfulqa_mc1": 0.5}}
    (argv,) = calls
    assert argv[:5] == ["eval", "--model", f"target={models['target']}", "--model", "fuserl=/models/final"]
    flags = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert flags == {"--suite": "honest,helpful", "--truthfulqa": str(tmp_path / "tqa.jsonl"), "--limit": "2",
                     "--device": "cpu", "--out": str(tmp_path / "stage" / "eval")}  # fmt: skip
