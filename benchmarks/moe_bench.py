"""The MoE layer (router + topk_route + expert FFN), forward and forward+backward: ours vs the reference per-expert
loop (transformers' eager Mixtral experts) vs `torch._grouped_mm` (CUDA, bf16, sm90 only).

`collect(device, quick)` returns one row per (case, impl, mode); `benchmarks.run` prints and saves them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import h3fusion_ext
from h3fusion_ext import reference

from .common import moe_flops, peak_memory_mb, time_interleaved

# CPU: the project's performance targets (fp32), each named by its shape.
CPU_CASES = [(2048, 512, 1408, 8, 2), (256, 512, 256, 64, 8), (16, 512, 256, 64, 8)]
# GPU (SPEC §7): model -> (H, F, E, k), in bf16.
GPU_MODELS = {"mixtral": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8), "h3fusion": (4096, 11008, 3, 2)}
GPU_TOKENS = (1, 128, 2048, 16384)
GPU_TOKENS_QUICK = (128, 4096)


def make_params(T: int, H: int, F: int, E: int, k: int, dtype: torch.dtype, device: str) -> dict:
    """Random layer inputs and weights at a realistic scale (unit-variance activations through each GEMM)."""
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "x": torch.randn(T, H, device=device, generator=g).to(dtype),
        "router": (torch.randn(E, H, device=device, generator=g) / H**0.5).to(dtype),
        "gate_up": (torch.randn(E, 2 * F, H, device=device, generator=g) / H**0.5).to(dtype),
        "down": (torch.randn(E, H, F, device=device, generator=g) / F**0.5).to(dtype),
        "k": k,
    }


def _route(mod, p):
    logits = F.linear(p["x"].float(), p["router"].float())  # the router runs in fp32 (SPEC §2)
    return mod.topk_route(logits, p["k"])


def layer_ours(p: dict) -> torch.Tensor:
    weights, experts = _route(h3fusion_ext, p)
    return h3fusion_ext.moe_ffn(p["x"], weights, experts, p["gate_up"], p["down"])


def layer_reference(p: dict) -> torch.Tensor:
    weights, experts = _route(reference, p)
    return reference.moe_ffn(p["x"], weights, experts, p["gate_up"], p["down"])


def layer_grouped_mm(p: dict) -> torch.Tensor:
    """Our routing/permutation around two `torch._grouped_mm` calls (2-D activations x 3-D weights, offsets)."""
    weights, experts = _route(h3fusion_ext, p)
    E, k = p["gate_up"].shape[0], p["k"]
    sorted_pairs, pair_rows, offsets = h3fusion_ext.moe_route_plan(experts, E)
    xs = h3fusion_ext.moe_gather(p["x"], sorted_pairs, k)
    ends = offsets[1:].to(torch.int32)  # _grouped_mm wants the end row of each group, int32
    # [E, 2F, H] viewed as [E, H, 2F] is column-major per expert, the layout _grouped_mm expects for mat_b.
    h = torch._grouped_mm(xs, p["gate_up"].transpose(1, 2), offs=ends)
    gate, up = h.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, p["down"].transpose(1, 2), offs=ends)
    return h3fusion_ext.moe_combine(out, weights, pair_rows)


def grouped_mm_available(device: str, dtype: torch.dtype) -> bool:
    return (
        hasattr(torch, "_grouped_mm")
        and device.startswith("cuda")
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability() == (9, 0)
    )


def _step(layer, p: dict, mode: str):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return layer(p)

        return run
    leaves = [p["x"], p["router"], p["gate_up"], p["down"]]

    def run_bwd():
        y = layer(p)
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run_bwd


def _cases(device: str, quick: bool):
    if not device.startswith("cuda"):
        for T, H, F_, E, k in CPU_CASES:
            yield f"T{T}-H{H}-F{F_}-E{E}-k{k}", T, H, F_, E, k, torch.float32
        return
    for model, (H, F_, E, k) in GPU_MODELS.items():
        for T in GPU_TOKENS_QUICK if quick else GPU_TOKENS:
            yield f"{model} T={T}", T, H, F_, E, k, torch.bfloat16


def collect(device: str, quick: bool) -> list[dict]:
    """Rows: bench, case, impl, mode, dtype, median_ms, tflops, peak_mem_mb, speedup_vs_reference (+ shape)."""
    rows: list[dict] = []
    on_gpu = device.startswith("cuda")
    for case, T, H, F_, E, k, dtype in _cases(device, quick):
        impls = {"ours": layer_ours, "reference": layer_reference}
        if grouped_mm_available(device, dtype):
            impls["torch._grouped_mm"] = layer_grouped_mm
        for mode in ("fwd", "fwd+bwd"):
            p = make_params(T, H, F_, E, k, dtype, device)
            for key in ("x", "router", "gate_up", "down"):
                p[key].requires_grad_(mode != "fwd")
            # Keeps the whole GPU run (3 models x 4 token counts x 2 modes x 3 impls) under ~3 minutes.
            budget = 1.0 if on_gpu else (4.0 if quick else 10.0)
            steps = {impl: _step(layer, p, mode) for impl, layer in impls.items()}
            timings = time_interleaved(
                steps, device, warmup=1 if quick else 2, repeats=5 if quick else 11, budget_s=budget
            )
            case_rows = []
            for impl, step in steps.items():
                row = {
                    "bench": "moe",
                    "case": case,
                    "impl": impl,
                    "mode": mode,
                    "dtype": str(dtype).split(".")[-1],
                    "T": T,
                    "H": H,
                    "F": F_,
                    "E": E,
                    "k": k,
                }
                timing = timings[impl]
                try:
                    if isinstance(timing, Exception):
                        raise timing
                    row.update(timing)
                    row["tflops"] = moe_flops(T, H, F_, E, k, mode != "fwd") / (timing["median_ms"] * 1e-3) / 1e12
                    row["peak_mem_mb"] = peak_memory_mb(step, device)
                except Exception as exc:  # one failing impl must not lose the other rows
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                case_rows.append(row)
            ref_ms = next((r.get("median_ms") for r in case_rows if r["impl"] == "reference"), None)
            for r in case_rows:
                if ref_ms and r.get("median_ms"):
                    r["speedup_vs_reference"] = ref_ms / r["median_ms"]
            rows += case_rows
            del p
            if on_gpu:
                torch.cuda.empty_cache()
    return rows
