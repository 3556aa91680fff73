"""Per-rank bodies of the expert-parallel tests: each rank builds the same single-process reference from a shared
seed, runs its share under expert parallelism and asserts equality (fp64, so only summation order differs)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from h3fusion.models import replace_moe_blocks
from h3fusion.models.moe_block import H3FusionMoE
from h3fusion.parallel import (
    build_expert_parallel_groups,
    convert_to_expert_parallel,
    expert_parallel_ffn,
    expert_partition,
    full_state_dict,
    ignore_expert_parameters_in_ddp,
    sync_expert_gradients,
)

import h3fusion_ext

TOL = dict(rtol=1e-10, atol=1e-12)


def _slices(world, counts):
    starts = [sum(counts[:r]) for r in range(world)]
    return [slice(s, s + c) for s, c in zip(starts, counts, strict=True)]


def check_layer(rank, world, ep_size, num_experts, seed):
    """expert_parallel_ffn and a converted H3FusionMoE equal the single-process layer: outputs, grads of x, routing
    weights, expert weights (summed over expert-data-parallel copies) and router; repeated runs are bitwise equal."""
    ep_group, edp_group = build_expert_parallel_groups(ep_size)
    g = torch.Generator().manual_seed(seed)
    H, F, k = 8, 6, 2
    counts = [5, 0, 7, 3, 4, 2][:world]  # uneven, and one rank has no tokens at all
    T = sum(counts)
    mine = _slices(world, counts)[rank]
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    e = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(T)]).int()
    gu = torch.randn(num_experts, 2 * F, H, generator=g, dtype=torch.float64)
    dp = torch.randn(num_experts, H, F, generator=g, dtype=torch.float64)
    dy = torch.randn(T, H, generator=g, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (x, w, gu, dp)]
    ref = h3fusion_ext.moe_ffn(leaves[0], leaves[1], e, leaves[2], leaves[3])
    (ref * dy).sum().backward()

    ep_rank = dist.get_rank(ep_group)
    start, stop = expert_partition(num_experts, ep_size)[ep_rank]
    outs = []
    for _ in range(2):
        xs, ws = x[mine].clone().requires_grad_(), w[mine].clone().requires_grad_()
        gus, dps = gu[start:stop].clone().requires_grad_(), dp[start:stop].clone().requires_grad_()
        y = expert_parallel_ffn(xs, ws, e[mine], gus, dps, num_experts, ep_group)
        (y * dy[mine]).sum().backward()
        outs.append((y.detach(), xs.grad, ws.grad, gus.grad, dps.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b), "expert_parallel_ffn is not deterministic"
    y, gx, gw, ggu, gdp = outs[0]
    torch.testing.assert_close(y, ref.detach()[mine], **TOL)
    torch.testing.assert_close(gx, leaves[0].grad[mine], **TOL)
    torch.testing.assert_close(gw, leaves[1].grad[mine], **TOL)
    for grad in (ggu, gdp):
        dist.all_reduce(grad, group=edp_group)
    torch.testing.assert_close(ggu, leaves[2].grad[start:stop], **TOL)
    torch.testing.assert_close(gdp, leaves[3].grad[start:stop], **TOL)

    # the module path: H3FusionMoE converted in place (router replicated, experts sharded)
    torch.manual_seed(seed)
    layer = H3FusionMoE(H, F, num_experts, k).double()
    full = copy.deepcopy(layer)
    xr = x.clone().requires_grad_()
    y_full, _ = full(xr)
    (y_full * dy).sum().backward()
    assert convert_to_expert_parallel(layer, ep_group) == 1
    assert layer.experts.gate_up_proj.shape[0] == stop - start
    xs = x[mine].clone().requires_grad_()
    y_ep, _ = layer(xs)
    (y_ep * dy[mine]).sum().backward()
    torch.testing.assert_close(y_ep, y_full.detach()[mine], **TOL)
    torch.testing.assert_close(xs.grad, xr.grad[mine], **TOL)
    dist.all_reduce(layer.router.weight.grad)  # the router is replicated: its gradient is the sum over all ranks
    # router logits are fp32 by design (design.md §2): its gradient sums per rank in fp32
    torch.testing.assert_close(layer.router.weight.grad, full.router.weight.grad, rtol=1e-5, atol=1e-7)
    sync_expert_gradients(layer, edp_group)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, full.experts.gate_up_proj.grad[start:stop], **TOL)
    torch.testing.assert_close(layer.experts.down_proj.grad, full.experts.down_proj.grad[start:stop], **TOL)


def _tiny_model(seed, num_experts, hidden_act="silu"):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=num_experts, num_experts_per_tok=2, max_position_embeddings=32,
        hidden_act=hidden_act,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg).double()
    replace_moe_blocks(model)  # routing and experts on the h3fusion ops, like a fused model being trained
    return model


def _lm_loss(model, ids):
    # in fp64 (transformers' own loss casts the logits to fp32, which would hide differences at 1e-7)
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def check_training(rank, world, ep_size, num_experts, seed, hidden_act="silu", steps=3):
    """A tiny Mixtral trained a few steps with EP (inside DDP) equals the single-process run on the global batch:
    the loss of every step and all final parameters."""
    from torch.nn.parallel import DistributedDataParallel

    ep_group, edp_group = build_expert_parallel_groups(ep_size)
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, 32, (2 * world, 6), generator=g)  # equal lengths: rank means average to the global
    mine = slice(2 * rank, 2 * rank + 2)

    ref = _tiny_model(seed, num_experts, hidden_act)
    model = copy.deepcopy(ref)
    # plain SGD: the update is linear in the gradient, so a wrong expert-gradient scale (grad_divisor, the
    # expert-data-parallel sum) changes the parameters; Adam would normalise it away
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_losses = []
    for _ in range(steps):
        loss = _lm_loss(ref, batch)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.item())

    assert convert_to_expert_parallel(model, ep_group, grad_divisor=world) == 2
    try:  # the transformers drop-in must not run local expert weights with global ids
        replace_moe_blocks(model)
        raise AssertionError("replace_moe_blocks accepted expert-parallel experts")
    except NotImplementedError as exc:
        assert "expert parallelism" in str(exc)
    ignore_expert_parameters_in_ddp(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        loss = _lm_loss(ddp, batch[mine])
        opt.zero_grad()
        loss.backward()
        sync_expert_gradients(model, edp_group)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        assert abs(mean.item() / world - ref_losses[step]) < 1e-10, (step, mean.item() / world, ref_losses[step])

    start, stop = expert_partition(num_experts, ep_size)[dist.get_rank(ep_group)]
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = want[start:stop]
        torch.testing.assert_close(p, want, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    # a standard checkpoint again: all experts gathered, the single-process model's keys and shapes
    full = full_state_dict(model)
    ref_state = ref.state_dict()
    assert set(full) == set(ref_state)
    for name, t in full.items():
        torch.testing.assert_close(t, ref_state[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def check_all(rank, world, ep_size, num_experts, seed, hidden_act="silu"):
    check_layer(rank, world, ep_size, num_experts, seed)
    # hidden_act: a GeGLU model must keep its activation through convert_to_expert_parallel
    check_training(rank, world, ep_size, num_experts, seed, hidden_act)
