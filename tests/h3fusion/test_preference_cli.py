"""`h3fusion fuse-sft` and `h3fusion fuse-po --loss ...` on a tiny model directory and a JSONL file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from h3fusion.cli import main
from h3fusion.data.preference import save_records
from h3fusion.utils.files import LOCK_FILE, OUTPUT_MARKER
from pref_tiny import random_records, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_and_data(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    save_records(random_records(6, per_source=2), data)
    return model_dir, data


def _common(model_dir, data, out):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", "3", "--lr", "5e-3",
            "--batch-size", "4", "--logging-steps", "1", "--max-length", "48", "--cpu", "--seed",
            str(int(torch.randint(0, 2**31, ()).item()))]  # fmt: skip


def _check_output(out: Path, model_dir: Path, command: str) -> dict:
    log = json.loads((out / "train_log.json").read_text())
    assert log["command"] == command and log["steps"] == 3
    assert sum("loss" in h for h in log["log_history"]) == 3
    own = {OUTPUT_MARKER, LOCK_FILE}  # the output folder's marker and run lock stay
    assert not [p for p in os.listdir(out) if p.startswith(".") and p not in own]  # temp files renamed away
    before = load_file(model_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert (out / "model" / "tokenizer.json").exists()
    return log


def test_fuse_sft_cli(model_and_data, tmp_path):
    model_dir, data = model_and_data
    out = tmp_path / "sft"
    extra = ["--top-k", "2", "--temperature", "0.5", "--gradient-checkpointing"]
    rc = main(["fuse-sft", *_common(model_dir, data, out), *extra])
    assert rc == 0
    log = _check_output(out, model_dir, "fuse-sft")
    assert log["items"] == 12  # 6 prompts x top-2


@pytest.mark.parametrize(
    "loss,extra",
    [
        ("dpo", ["--beta", "0.5"]),
        ("dpo_norm", []),
        ("simpo", ["--beta", "2", "--gamma", "0.3", "--pair-mode", "global"]),
        ("wrpo", ["--target-source", "target", "--alpha-max", "0.4"]),
        ("rloo", ["--kl-coef", "0.1", "--rloo-temperature", "1.0"]),
    ],
)
def test_fuse_po_cli(loss, extra, model_and_data, tmp_path):
    model_dir, data = model_and_data
    out = tmp_path / loss
    assert main(["fuse-po", *_common(model_dir, data, out), "--loss", loss, *extra]) == 0
    log = _check_output(out, model_dir, "fuse-po")
    assert log["loss"] == loss
    if loss != "simpo":
        assert list((out / "ref_cache").glob("ref_logps-*.json"))


def test_cli_help_and_errors(model_and_data, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'python'}"}
    res = subprocess.run([sys.executable, "-m", "h3fusion", "fuse-po", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "--loss" in res.stdout and "wrpo" in res.stdout
    model_dir, data = model_and_data
    assert main(["fuse-po", *_common(model_dir, data, tmp_path / "x"), "--loss", "wrpo"]) == 2
    assert "--target-source" in capsys.readouterr().err


def _fails_with(argv, pattern, capsys) -> None:
    """The command fails with a message matching `pattern`: raised (ValueError / SystemExit) or printed with a
    non-zero exit status, whichever way the CLI reports errors."""
    import re

    try:
        rc = main(argv)
    except (ValueError, SystemExit) as exc:
        assert re.search(pattern, str(exc)), str(exc)
        return
    captured = capsys.readouterr()
    assert rc != 0 and re.search(pattern, captured.err + captured.out), (rc, captured)


def test_fuse_sft_cli_tiny_temperature_trains(model_and_data, tmp_path):
    model_dir, data = model_and_data
    out = tmp_path / "cold"
    # one whole epoch at batch size 1: most surviving items carry a vanishing weight at tau = 0.02, but the epoch
    # visits every item, and the weights average 1, so some step must move the model
    args = [*_common(model_dir, data, out), "--temperature", "0.02", "--batch-size", "1", "--max-steps", "-1"]
    with pytest.warns(UserWarning, match="dropped"):  # rewards in [-2, 2]: exp(-gap / 0.02) is 0 in float32
        assert main(["fuse-sft", *args]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert 6 <= log["items"] < 36 and log["steps"] == log["items"]  # the run never died from zero weights
    losses = [h["loss"] for h in log["log_history"] if "loss" in h]
    assert all(math.isfinite(v) for v in losses) and max(losses) > 0
    before = load_file(model_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_cli_data_errors_name_the_file_before_any_output(model_and_data, tmp_path, capsys):
    model_dir, _ = model_and_data
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin.jsonl"
    record = {"prompt": "caf\u00e9", "responses": [{"text": "a", "source": "s", "reward": 1.0}]}
    latin.write_bytes(json.dumps(record, ensure_ascii=False).encode("latin-1") + b"\n")
    for command in ("fuse-sft", "fuse-po"):
        out = tmp_path / f"out-{command}"
        _fails_with([command, *_common(model_dir, empty, out)], r"empty.jsonl: no records", capsys)
        _fails_with([command, *_common(model_dir, latin, out)], r"latin.jsonl: not a UTF-8 text file", capsys)
        assert not out.exists()  # nothing made before the data was read


def test_cli_wrpo_names_a_missing_target_source(model_and_data, tmp_path, capsys):
    model_dir, data = model_and_data
    out = tmp_path / "wrpo"
    argv = ["fuse-po", *_common(model_dir, data, out), "--loss", "wrpo", "--target-source", "tagret"]
    _fails_with(argv, r"'tagret' has no responses.*sources present: \['alpha', 'beta', 'target'\]", capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["fuse-sft", "fuse-po"])
def test_resume_equals_uninterrupted(model_and_data, tmp_path, command):
    # A run that died after its step-2 checkpoint, resumed with --resume, ends where the uninterrupted run ends.
    import shutil

    model_dir, data = model_and_data
    argv = [command, *_common(model_dir, data, tmp_path / "full"), "--save-steps", "1"]
    assert main(argv) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for lost in ("checkpoints/checkpoint-3", "model", "train_log.json"):  # what the crash never wrote
        target = crashed / lost
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    argv[argv.index(str(tmp_path / "full"))] = str(crashed)
    assert main([*argv, "--resume"]) == 0
    full = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(crashed / "model" / "model.safetensors")
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the log is whole again (steps 1-2 restored from the checkpoint, step 3 run anew) and equals the full run's
    losses = [
        [(h["step"], h["loss"]) for h in json.loads((out / "train_log.json").read_text())["log_history"] if "loss" in h]
        for out in (tmp_path / "full", crashed)
    ]
    assert [step for step, _ in losses[1]] == [1, 2, 3]
    assert [loss for _, loss in losses[1]] == pytest.approx([loss for _, loss in losses[0]], rel=1e-5)


def test_resume_and_overwrite_conflict(model_and_data, tmp_path, capsys):
    model_dir, data = model_and_data
    rc = main(["fuse-sft", *_common(model_dir, data, tmp_path / "o"), "--resume", "--overwrite"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
