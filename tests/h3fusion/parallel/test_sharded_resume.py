"""Checkpoints under FSDP2 (2 gloo CPU processes): a run interrupted after a checkpoint and resumed from it ends where
the uninterrupted run ends (the same losses for the remaining steps, the same final parameters), with AdamW so the
optimizer state has to come back too (issue 13 item 1, design.md §9)."""

from __future__ import annotations

import random

import pytest
import torch
from test_sharded_training import _run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
]


@pytest.mark.parametrize("trainer", ["h3fusion", "sft"], ids=["h3fusion-drift-fsdp2", "fuse-sft-fsdp2"])
def test_fsdp2_resume_equals_uninterrupted(tmp_path, trainer):
    seed = random.randint(0, 10_000)
    common = dict(trainer=trainer, nproc=2, batch=2, fsdp=True, seed=seed)
    extra = ["--steps", "4", "--optim", "adamw_torch"]
    want_losses, want_params = _run(tmp_path / "whole", **common, extra=extra)
    assert len(want_losses) == 4
    _, cut_params = _run(tmp_path / "cut", **common, extra=[*extra, "--save-steps", "2", "--stop-after", "2"])
    checkpoint = tmp_path / "cut" / "run" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    losses, params = _run(tmp_path / "resumed", **common, extra=[*extra, "--resume", str(checkpoint)])
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)  # steps 1-2 from the checkpoint's log, then 3-4
    assert set(params) == set(want_params)
    for name, p in params.items():
        torch.testing.assert_close(p, want_params[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # steps 3-4 really moved the weights (the comparison above is not between two copies of the step-2 model)
    moved = sum(not torch.allclose(cut_params[n], params[n], rtol=1e-5, atol=1e-6) for n in params)
    assert moved > 0
