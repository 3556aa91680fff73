"""pytest-benchmark microbenchmarks of each MoE op (run with `pytest benchmarks/`; not part of the `tests/` run).

Small CPU shapes by default; on a CUDA machine the same benchmarks run on the GPU in bf16.
"""

from __future__ import annotations

import pytest
import torch
from h3fusion.bench.common import synchronize
from h3fusion.bench.moe_bench import layer_ours, layer_reference, make_params

import h3fusion_ext
from h3fusion_ext import reference

DEVICE = "cuda" if torch.cuda.is_available() and h3fusion_ext.has_cuda_kernels() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = {"T256-E64-k8": (256, 512, 256, 64, 8), "T1024-E8-k2": (1024, 512, 704, 8, 2)}
if DEVICE == "cuda":
    SHAPES = {"qwen3-T4096": (4096, 2048, 768, 128, 8), "mixtral-T4096": (4096, 4096, 14336, 8, 2)}


@pytest.fixture(params=list(SHAPES), scope="module")
def params(request):
    return make_params(*SHAPES[request.param], DTYPE, DEVICE)


def _routed(p):
    logits = torch.nn.functional.linear(p["x"].float(), p["router"].float())
    weights, experts = h3fusion_ext.topk_route(logits, p["k"])
    return logits, weights, experts


def _bench(benchmark, fn):
    def run():
        out = fn()
        synchronize(DEVICE)
        return out

    return benchmark(run)


def test_topk_route(benchmark, params):
    logits, _, _ = _routed(params)
    _bench(benchmark, lambda: h3fusion_ext.topk_route(logits, params["k"]))


def test_moe_route_plan(benchmark, params):
    _, _, experts = _routed(params)
    _bench(benchmark, lambda: h3fusion_ext.moe_route_plan(experts, params["gate_up"].shape[0]))


def test_moe_gather(benchmark, params):
    _, _, experts = _routed(params)
    sorted_pairs, _, _ = h3fusion_ext.moe_route_plan(experts, params["gate_up"].shape[0])
    _bench(benchmark, lambda: h3fusion_ext.moe_gather(params["x"], sorted_pairs, params["k"]))


def test_moe_combine(benchmark, params):
    _, weights, experts = _routed(params)
    _, pair_rows, _ = h3fusion_ext.moe_route_plan(experts, params["gate_up"].shape[0])
    rows = torch.randn(experts.numel(), params["x"].shape[1], device=DEVICE, dtype=DTYPE)
    _bench(benchmark, lambda: h3fusion_ext.moe_combine(rows, weights, pair_rows))


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_moe_ffn_forward(benchmark, params, impl):
    _, weights, experts = _routed(params)
    ffn = h3fusion_ext.moe_ffn if impl == "ours" else reference.moe_ffn
    with torch.no_grad():
        _bench(benchmark, lambda: ffn(params["x"], weights, experts, params["gate_up"], params["down"]))


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_moe_layer_forward_backward(benchmark, params, impl):
    layer = layer_ours if impl == "ours" else layer_reference
    leaves = [params[key].requires_grad_() for key in ("x", "router", "gate_up", "down")]

    def step():
        y = layer(params)
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    _bench(benchmark, step)
