"""Per-rank body of the sharded-drift test: FSDP2 (`fully_shard`, DTensor parameters) vs one process."""

from __future__ import annotations

import copy

import torch
from h3fusion.losses.gating import canonical_param_name, drift_regularization, expert_reference_state
from h3fusion.losses.sharded_drift import is_sharded, shard_reference_state


def check_sharded_drift(rank, world, seed):
    """The drift regularizer of an FSDP2-sharded model equals the single-process one (value, and each rank's
    gradient shard equals the matching rows of the full gradient), with θ⁽⁰⁾ held sharded; 3 experts over 2 ranks
    shard unevenly and one expert has not moved (ΔW = 0: the sqrt's zero subgradient)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=32, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=16,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg)
    theta0 = expert_reference_state(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if canonical_param_name(name) in theta0:
                p[:2].add_(torch.randn_like(p[:2]) * 0.05)  # expert 2 stays at θ⁽⁰⁾
    gammas = [0.3, 0.1, 0.7]
    for squared in (False, True):
        single = copy.deepcopy(model)
        want = drift_regularization(single, theta0, gammas, squared=squared)
        want.backward()
        want_grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}

        sharded = copy.deepcopy(model)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        ref = dict(theta0)
        shard_reference_state(sharded, ref, canonical_param_name)
        for key, value in ref.items():
            assert is_sharded(value), f"θ⁽⁰⁾ {key} is not held sharded"
        got = drift_regularization(sharded, ref, gammas, squared=squared)
        assert not is_sharded(got)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
        got.backward()
        grads = {n: p.grad for n, p in sharded.named_parameters() if p.grad is not None}
        assert set(grads) == set(want_grads), (sorted(grads), sorted(want_grads))
        for name, g in grads.items():
            assert is_sharded(g)
            torch.testing.assert_close(g.full_tensor(), want_grads[name], rtol=1e-6, atol=1e-8)
