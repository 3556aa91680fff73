"""FuseSFT / FusePO (DPO) / H3Fusion (drift regularizer on sharded experts) under DDP and FSDP2 (`fully_shard`
through the Trainer's fsdp_config) on 2 gloo CPU processes equal the single-process run for the same global batch:
every step's loss and all final parameters (design.md §9). Gradient accumulation is in the mix: the loss is the
global item mean over ranks and micro-steps."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SCRIPT = os.path.join(HERE, "pref_train_script.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
]


def _run(out, trainer, nproc, batch, ga=1, fsdp=False, seed=0, extra=()):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    args = [SCRIPT, "--trainer", trainer, "--out", str(out), "--batch", str(batch), "--ga", str(ga)]
    args += ["--seed", str(seed)]
    args += ["--fsdp"] if fsdp else []
    args += list(extra)
    if nproc > 1:
        port = str(free_port())
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port, *args]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text()), load_file(out / "final.safetensors")


@pytest.fixture(scope="module")
def seed():
    return random.randint(0, 10_000)


@pytest.fixture(scope="module")
def single(tmp_path_factory, seed):
    cache = {}

    def get(trainer):
        if trainer not in cache:
            cache[trainer] = _run(tmp_path_factory.mktemp(f"single-{trainer}"), trainer, 1, batch=4, seed=seed)
        return cache[trainer]

    return get


def _assert_same(got, want):
    (losses, params), (want_losses, want_params) = got, want
    assert len(losses) == len(want_losses) == 3
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    assert set(params) == set(want_params)
    for name, p in params.items():
        torch.testing.assert_close(p, want_params[name], rtol=1e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "trainer,batch,ga,fsdp",
    [("sft", 1, 2, False), ("sft", 2, 1, True), ("dpo", 1, 2, True), ("h3fusion", 2, 1, True)],
    ids=["sft-ddp-grad-accum", "sft-fsdp2", "dpo-fsdp2-grad-accum", "h3fusion-drift-fsdp2"],
)
def test_two_processes_equal_single_process(tmp_path, single, seed, trainer, batch, ga, fsdp):
    got = _run(tmp_path / "two", trainer, 2, batch=batch, ga=ga, fsdp=fsdp, seed=seed)
    _assert_same(got, single(trainer))
