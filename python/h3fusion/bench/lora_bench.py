"""LoRA experts (design.md §11): ours against PEFT's `target_parameters` path, and shared-base against materialised
experts, on the same weights and routing, measured side by side (interleaved call by call, after two warm-ups).

* `lora fwd+bwd`: `LoRAExperts` (adapters inside `moe_ffn(..., lora=...)`, base frozen) against transformers'
  `MixtralExperts` (its default `grouped_mm` implementation) wrapped by PEFT's LoRA on both 3-D expert weights
  (which forms W + s·B·A for every expert at every forward). Gradients of x, the routing weights and the factors.
  Rows: median time, peak memory (beyond inputs and weights), `speedup_vs_peft`, `mem_vs_peft`, and the largest
  output difference between the two (`max_abs_diff`: both compute the same function).
* `shared`: E experts as one shared base FFN plus rank-r adapters (`LoRAExperts` with a `[1, ...]` base) against the
  same E experts materialised (`moe_ffn` on W + s·B·A), forward (no grad) and fwd+bwd (shared: factors train;
  materialised: frozen experts, gradients of x and the routing weights only). Rows add `weight_mem_mb` (the FFN
  weights each layout keeps), `time_vs_materialized` and `mem_vs_materialized` (weight memory, shared / materialised).

`collect(device, quick)` returns the rows for `h3fusion.bench.runner` (`h3fusion bench --only lora`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import h3fusion_ext

from .common import peak_memory_mb, time_interleaved
from .moe_bench import hf_experts

# (T, H, F, E, k, r)
CPU_LORA_CASES = [(2048, 1024, 2816, 8, 2, 16)]
CPU_SHARED_CASES = [(2048, 1024, 2816, 3, 2, 16)]
QUICK_LORA_CASES = [(64, 64, 96, 4, 2, 4)]
QUICK_SHARED_CASES = [(64, 64, 96, 3, 2, 4)]


def _case(T, H, F_, E, k, r) -> str:
    return f"T{T} H{H} F{F_} E{E} k{k} r{r}"


def _inputs(T, H, F_, E, k, r, base_experts, device, dtype=torch.float32):
    """x [T,H], routing (weights [T,k] fp32, experts [T,k] int32), frozen base [base_experts, ...], and a
    `LoRAExperts` on it with random non-zero factors (unit-variance activations through every GEMM)."""
    from h3fusion.models.lora_experts import LoRAExperts

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    router = torch.randn(E, H, device=device, generator=g) / H**0.5
    weights, experts = h3fusion_ext.topk_route(F.linear(x.float(), router), k)
    gate_up = (torch.randn(base_experts, 2 * F_, H, device=device, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(base_experts, H, F_, device=device, generator=g) / F_**0.5).to(dtype)
    module = LoRAExperts(gate_up, down, E, r, lora_alpha=2.0 * r)
    with torch.no_grad():
        for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, device=device, generator=g) / p.shape[-1] ** 0.5 * 0.1)
    return x, weights, experts, module


def _peft_experts(module, device):
    """transformers' `MixtralExperts` (grouped_mm) on `module`'s base, with PEFT LoRA holding `module`'s factors."""
    import peft

    from h3fusion.models.lora_adapter_io import to_peft_layout
    from h3fusion.models.lora_experts import FACTOR_NAMES

    holder = torch.nn.Module()
    holder.experts = hf_experts("grouped_mm", module.gate_up_proj, module.down_proj)
    config = peft.LoraConfig(
        r=module.rank,
        lora_alpha=module.lora_alpha,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    holder = peft.inject_adapter_in_model(config, holder)
    wrapper, found = holder.experts, set()
    with torch.no_grad():
        while hasattr(wrapper, "parameter_name"):  # PEFT's nested ParamWrappers, one per targeted weight
            a_name, b_name = FACTOR_NAMES[wrapper.parameter_name]
            lora_a, lora_b = to_peft_layout(getattr(module, a_name), getattr(module, b_name))
            wrapper.lora_A["default"].weight.copy_(lora_a)
            wrapper.lora_B["default"].weight.copy_(lora_b)
            found.add(wrapper.parameter_name)
            wrapper = wrapper.base_layer
    if found != set(FACTOR_NAMES):
        raise RuntimeError(f"PEFT wrapped {sorted(found)}, expected {sorted(FACTOR_NAMES)}")
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    return holder.to(device).experts


def _grad_step(fn, leaves):
    def run():
        y = fn()
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def lora_rows(T, H, F_, E, k, r, device) -> list[dict]:
    """LoRAExperts vs PEFT target_parameters, fwd+bwd with the base frozen."""
    x, weights, experts, module = _inputs(T, H, F_, E, k, r, E, device)
    theirs = _peft_experts(module, device)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    top_k_index = experts.long()
    ours_leaves = [x, weights, *(p for p in module.parameters() if p.requires_grad)]
    peft_leaves = [x, weights, *(p for p in theirs.parameters() if p.requires_grad)]
    assert len(ours_leaves) == len(peft_leaves) == 6
    fns = {
        "ours": _grad_step(lambda: module(x, experts, weights), ours_leaves),
        "peft": _grad_step(lambda: theirs(x, top_k_index, weights), peft_leaves),
    }
    with torch.no_grad():
        diff = float((module(x, experts, weights) - theirs(x, top_k_index, weights)).abs().max())
    times = time_interleaved(fns, device, repeats=5, budget_s=20.0)
    case, rows = _case(T, H, F_, E, k, r), []
    for name, label in (("ours", "ours (LoRAExperts)"), ("peft", "PEFT target_parameters (grouped_mm)")):
        row = {"bench": "lora", "case": case, "impl": label, "mode": "fwd+bwd frozen base", "dtype": "fp32"}
        if isinstance(times[name], Exception):
            row["error"] = f"{type(times[name]).__name__}: {times[name]}"
        else:
            row["median_ms"] = times[name]["median_ms"]
            row["peak_mem_mb"] = peak_memory_mb(fns[name], device)
        rows.append(row)
    ours, peft = rows
    if "median_ms" in ours and "median_ms" in peft:
        ours["speedup_vs_peft"] = round(peft["median_ms"] / ours["median_ms"], 3)
        ours["mem_vs_peft"] = round(ours["peak_mem_mb"] / peft["peak_mem_mb"], 3) if peft["peak_mem_mb"] else None
        ours["max_abs_diff"] = diff
    return rows


def shared_rows(T, H, F_, E, k, r, device) -> list[dict]:
    """Shared base + adapters vs the same experts materialised, forward and fwd+bwd."""
    x, weights, experts, module = _inputs(T, H, F_, E, k, r, 1, device)
    gate_up, down = module.merged_weights()  # [E, ...]: the materialised experts, frozen
    x.requires_grad_(True)
    weights.requires_grad_(True)
    factors = [p for p in module.parameters() if p.requires_grad]
    modes = {
        "fwd": {
            "shared": _no_grad(lambda: module(x, experts, weights)),
            "materialised": _no_grad(lambda: h3fusion_ext.moe_ffn(x, weights, experts, gate_up, down)),
        },
        "fwd+bwd": {
            "shared": _grad_step(lambda: module(x, experts, weights), [x, weights, *factors]),
            "materialised": _grad_step(lambda: h3fusion_ext.moe_ffn(x, weights, experts, gate_up, down), [x, weights]),
        },
    }
    mb = 2**20
    weight_mem = {
        "shared": sum(p.numel() * p.element_size() for p in module.parameters()) / mb,
        "materialised": (gate_up.numel() + down.numel()) * gate_up.element_size() / mb,
    }
    rows = []
    for mode, fns in modes.items():
        times = time_interleaved(fns, device, repeats=5, budget_s=20.0)
        for name in ("shared", "materialised"):
            row = {"bench": "lora", "case": _case(T, H, F_, E, k, r), "impl": name, "mode": mode, "dtype": "fp32"}
            row["weight_mem_mb"] = round(weight_mem[name], 2)
            if isinstance(times[name], Exception):
                row["error"] = f"{type(times[name]).__name__}: {times[name]}"
            else:
                row["median_ms"] = times[name]["median_ms"]
            rows.append(row)
        shared, mat = rows[-2], rows[-1]
        if "median_ms" in shared and "median_ms" in mat:
            shared["time_vs_materialized"] = round(shared["median_ms"] / mat["median_ms"], 3)
        shared["mem_vs_materialized"] = round(weight_mem["shared"] / weight_mem["materialised"], 3)
    return rows


def collect(device: str, quick: bool) -> list[dict]:
    """Every row of this bench (tiny shapes when `quick`)."""
    rows = []
    for case in QUICK_LORA_CASES if quick else CPU_LORA_CASES:
        rows += lora_rows(*case, device)
    for case in QUICK_SHARED_CASES if quick else CPU_SHARED_CASES:
        rows += shared_rows(*case, device)
    return rows
