"""`h3fusion train` under torchrun: 2 CPU processes (gloo) match the single-process run's losses step by step."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import free_port
from h3fusion.data import InstructionExample, save_instructions
from training_tiny import EXPERT_NAMES, tiny_mixtral_config, word_level_tokenizer
from transformers import AutoModelForCausalLM, MixtralForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(tmp_path):
    words = [f"w{i}" for i in range(30)]
    tok = word_level_tokenizer([":", *words])
    MixtralForCausalLM(tiny_mixtral_config(h3fusion={"experts": EXPERT_NAMES})).save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    # equal lengths: every rank's token-mean LM loss then averages to the single process's
    exs = []
    for i in range(24):
        cat = EXPERT_NAMES[i % 3]
        offset = 10 * (i % 3)
        exs.append(
            InstructionExample(
                " ".join(random.choice(words[offset : offset + 10]) for _ in range(4)),
                " ".join(random.choice(words) for _ in range(3)),
                cat,
            )
        )
    save_instructions(exs, tmp_path / "data.jsonl")


def _train(tmp_path, out, nproc, seed):
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'python')}",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    train = [
        "-m",
        "h3fusion",
        "train",
        str(tmp_path / "fused"),
        "--data",
        str(tmp_path / "data.jsonl"),
        "--out",
        str(out),
        "--template",
        "{instruction} :",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
        "--lr",
        "1e-2",
        "--lambda-gate",
        "0.5",
        "--gammas",
        "1e-2,1e-3,1e-1",
        "--save-steps",
        "100",
        "--seed",
        str(seed),
        "--no-cuda",
    ]
    if nproc == 1:
        cmd = [sys.executable, *train, "--batch-size", "4"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            *train,
            "--batch-size",
            str(4 // nproc),
            "--ddp-backend",
            "gloo",
        ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    return [h for h in log if "loss" in h]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_matches_single_process(tmp_path):
    _setup(tmp_path)
    seed = random.randint(0, 10_000)
    single = _train(tmp_path, tmp_path / "one", 1, seed)
    double = _train(tmp_path, tmp_path / "two", 2, seed)
    assert len(single) == len(double) == 3
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "lm_loss", "gate_loss", "drift_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (key, a, b)
    assert single[-1]["drift_loss"] > 0  # the experts moved, in both runs alike
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert final.config.h3fusion["experts"] == EXPERT_NAMES
