"""Bad input to the MoE ops raises a RuntimeError that names the offending argument (design.md §5)."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext

T, H, F, E, K = 6, 8, 5, 4, 2


def good_inputs(dtype=torch.float32):
    x = torch.randn(T, H, dtype=dtype)
    weights = torch.rand(T, K)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    return dict(
        x=x,
        weights=weights,
        experts=experts,
        gate_up_proj=torch.randn(E, 2 * F, H, dtype=dtype),
        down_proj=torch.randn(E, H, F, dtype=dtype),
    )


def test_good_inputs_run():
    assert h3fusion_ext.moe_ffn(**good_inputs()).shape == (T, H)


# ---- topk_route ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits", [torch.randn(10), torch.randn(2, 3, 4), torch.randint(0, 5, (4, 6))], ids=["1-D", "3-D", "int"]
)
def test_topk_route_bad_logits(logits):
    with pytest.raises(RuntimeError, match="logits"):
        h3fusion_ext.topk_route(logits, 2)


@pytest.mark.parametrize("k", [0, 7, -1])
def test_topk_route_bad_k(k):
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        h3fusion_ext.topk_route(torch.randn(4, 6), k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_topk_route_non_finite_logits(bad):
    logits = torch.randn(5, 6)
    logits[3, 2] = bad
    with pytest.raises(RuntimeError, match="logits"):
        h3fusion_ext.topk_route(logits, 2)


# ---- route plan, gather, combine --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [E, -1, 1000])
def test_route_plan_expert_out_of_range(bad_id):
    experts = good_inputs()["experts"]
    experts[2, 1] = bad_id
    with pytest.raises(RuntimeError, match="experts"):
        h3fusion_ext.moe_route_plan(experts, E)


@pytest.mark.parametrize(
    "experts", [torch.zeros(T, K, dtype=torch.int64), torch.zeros(T * K, dtype=torch.int32)], ids=["int64", "1-D"]
)
def test_route_plan_bad_experts(experts):
    with pytest.raises(RuntimeError, match="experts"):
        h3fusion_ext.moe_route_plan(experts, E)


def test_gather_bad_sorted_pairs():
    x = torch.randn(T, H)
    with pytest.raises(RuntimeError, match="sorted_pairs"):
        h3fusion_ext.moe_gather(x, torch.arange(T * K - 1, dtype=torch.int32), K)
    with pytest.raises(RuntimeError, match="sorted_pairs"):
        h3fusion_ext.moe_gather(x, torch.arange(T * K, dtype=torch.int64), K)
    with pytest.raises(RuntimeError, match="sorted_pairs"):
        h3fusion_ext.moe_gather(x, torch.full((T * K,), T * K, dtype=torch.int32), K)


def test_combine_bad_arguments():
    rows, pair_rows = torch.randn(T * K, H), torch.randperm(T * K).to(torch.int32)
    with pytest.raises(RuntimeError, match="weights"):
        h3fusion_ext.moe_combine(rows, torch.rand(T + 1, K), pair_rows)
    with pytest.raises(RuntimeError, match="pair_rows"):
        h3fusion_ext.moe_combine(rows, torch.rand(T, K), pair_rows.long())
    with pytest.raises(RuntimeError, match="pair_rows"):
        h3fusion_ext.moe_combine(rows, torch.rand(T, K), pair_rows + T * K)


# ---- moe_ffn ------------------------------------------------------------------------------------------------------

BAD_FFN = {
    "x rank": ("x", lambda a: a["x"].reshape(-1)),
    "x dtype": ("x", lambda a: a["x"].to(torch.int32)),
    "weights rank": ("weights", lambda a: a["weights"].reshape(-1)),
    "weights rows": ("weights", lambda a: torch.rand(T + 1, K)),
    "weights dtype": ("weights", lambda a: a["weights"].to(torch.float16)),
    "experts dtype": ("experts", lambda a: a["experts"].long()),
    "experts shape": ("experts", lambda a: a["experts"][:, :1].contiguous()),
    "experts rank": ("experts", lambda a: a["experts"].reshape(-1)),
    "expert id = E": ("experts", lambda a: torch.full_like(a["experts"], E)),
    "expert id < 0": ("experts", lambda a: torch.full_like(a["experts"], -1)),
    "gate_up rank": ("gate_up_proj", lambda a: a["gate_up_proj"][0]),
    "gate_up H": ("gate_up_proj", lambda a: torch.randn(E, 2 * F, H + 1)),
    "gate_up odd": ("gate_up_proj", lambda a: torch.randn(E, 2 * F + 1, H)),
    "gate_up dtype": ("gate_up_proj", lambda a: a["gate_up_proj"].double()),
    "down rank": ("down_proj", lambda a: a["down_proj"][0]),
    "down E": ("down_proj", lambda a: torch.randn(E + 1, H, F)),
    "down H": ("down_proj", lambda a: torch.randn(E, H + 1, F)),
    "down F": ("down_proj", lambda a: torch.randn(E, H, F + 1)),
    "down dtype": ("down_proj", lambda a: a["down_proj"].to(torch.bfloat16)),
}


@pytest.mark.parametrize("case", list(BAD_FFN))
def test_moe_ffn_bad_argument(case):
    name, make_bad = BAD_FFN[case]
    args = good_inputs()
    args[name] = make_bad(args)
    with pytest.raises(RuntimeError, match=name):
        h3fusion_ext.moe_ffn(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["weights", "experts", "gate_up_proj", "down_proj"])
def test_moe_ffn_device_mismatch(name):
    args = {k: v.cuda() for k, v in good_inputs().items()}
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=name):
        h3fusion_ext.moe_ffn(**args)


# ---- the CUDA kernels' own argument checks, reached without a GPU ---------------------------------------------
# A CUDA build (CI builds one) registers the CUDA kernels; redispatching a call to the CUDA key with host tensors
# runs their argument checks up to "must be a CUDA tensor". On the first GPU run, checks that threw from .cu host
# code crashed the process instead of raising (csrc/include/h3fusion/checks.h): these calls must raise and name
# the argument.
needs_cuda_build = pytest.mark.skipif(
    not h3fusion_ext.has_cuda_kernels(), reason="needs a CUDA build of h3fusion_ext (CI builds one; no GPU needed)"
)


def _cuda_kernel_calls() -> dict:
    """op name -> (the argument the error must name, the op's arguments on the host)."""
    g = good_inputs()
    x, w, e, gu, dp = g["x"], g["weights"], g["experts"], g["gate_up_proj"], g["down_proj"]
    logits, sp, r, V = torch.randn(T, E), torch.arange(T * K, dtype=torch.int32), 2, 11
    lora = (torch.randn(E, r, H), torch.randn(E, 2 * F, r), torch.randn(E, r, F), torch.randn(E, H, r))
    hidden, lm_head, targets, n = torch.randn(T, H), torch.randn(V, H), torch.randint(0, V, (T,)), torch.randn(T)
    offsets = torch.tensor([0, 3, 6, 9, 12], dtype=torch.int64)
    return {
        "topk_route": ("logits", (logits, K, True)),
        "topk_route_backward": ("logits", (torch.randn(T, K), logits, e, True)),
        "moe_route_plan": ("experts", (e, E)),
        "moe_gather": ("x", (x, sp, K)),
        "moe_combine": ("rows", (torch.randn(T * K, H), w, sp)),
        "moe_ffn_forward": ("x", (x, w, e, gu, dp, True, "silu")),
        "moe_ffn_backward": ("x", (x, x, w, gu, dp, sp, sp, offsets, torch.randn(T * K, 2 * F), [True] * 4, "silu")),
        "moe_lora_ffn_forward": ("x", (x, w, e, gu, dp, *lora, 1.0, "silu", True)),
        "linear_logprob_forward": ("hidden", (hidden, lm_head, targets, -100)),
        "linear_logprob_backward": ("hidden", (n, n, hidden, lm_head, targets, n, -100, [True, True])),
    }


@needs_cuda_build
@pytest.mark.parametrize("op", list(_cuda_kernel_calls()))
def test_cuda_kernel_checks_raise_on_host_tensors(op):
    name, args = _cuda_kernel_calls()[op]
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=f"{name} must be a CUDA tensor"):
        getattr(torch.ops.h3fusion, op).default.redispatch(cuda_only, *args)


@needs_cuda_build
def test_cuda_moe_ffn_refuses_float64_by_name():
    # the very check that crashed on the H200 (test_cuda_moe_ffn.py::test_bad_inputs_name_the_argument); it comes
    # before the device check, so a host float64 x reaches it
    g = {k: (v.double() if v.is_floating_point() and k != "weights" else v) for k, v in good_inputs().items()}
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match="x has dtype float64, which moe_ffn supports on the CPU only"):
        torch.ops.h3fusion.moe_ffn_forward.default.redispatch(
            cuda_only, g["x"], g["weights"], g["experts"], g["gate_up_proj"], g["down_proj"], True, "silu"
        )
