"""The MoE experts FFN, ours (`h3fusion_ext.moe_ffn`) against transformers' own experts implementations
(`eager`, `grouped_mm`, `batched_mm`, called through `MixtralExperts` on the same weights and the same routing), and
a plain dense `mm` of the same dtype and thread count measured in the same run.

One row per (case, dtype, mode) with every implementation's median time as its own column, `vs_best` (the fastest
transformers implementation's time / ours), and ours against the machine's two limits, each measured in the same run:
`pct_of_dense`, our FLOP rate as a percentage of the dense `mm`'s (the limit of the large shapes), and
`pct_of_memory`, the bytes the layer cannot avoid moving over our time, as a percentage of the rate at which one
plain `sum` reads a contiguous copy of the active experts' weights, their bytes seen as fp32 words so that the rate
does not depend on the dtype (the limit at decode sizes, where each weight is used by a token or two).
Bytes that cannot be avoided: the active experts' weights, read once in the forward and once more in the backward,
and, with weight gradients, a gradient for every expert written once (activations, a few rows at decode sizes, are
left out, so this is a lower bound on the bytes). Above 100% means part of the weights came from the cache: the
benchmark calls one layer over and over, where a model's layers would each bring their own weights.
Modes: `fwd` (torch.no_grad), `fwd+bwd` (gradients of x, routing weights and both expert weights) and
`fwd+bwd frozen` (expert weights frozen: gradients of x and routing weights only, as with LoRA or frozen experts).
Every implementation gets two untimed warm-up calls (a user's first steps), then the implementations run
interleaved call by call so that load drift on a shared machine hits all of them alike; on the CPU one whose first
call takes over 10 s is timed by that call alone (listed in the row's `single_call`).
Routing (router GEMM, softmax, top-k) is computed once outside the timed region: it is the same for every
implementation. FLOPs: 6*T*k*H*F forward, 3x that for fwd+bwd (2x for frozen experts: no weight-gradient GEMMs).

`collect(device, quick)` returns the rows for `h3fusion.bench.runner`; `python -m h3fusion.bench.moe_bench --case T2048`
prints the rows of the cases whose name contains the filter (quick A/B runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import h3fusion_ext
from h3fusion_ext import reference

from .common import format_table, peak_memory_mb, time_interleaved

# (T, H, F, E, k): the E8 k2 training shapes, a many-small-experts shape and two decode sizes.
CPU_CASES = [
    (2048, 512, 1408, 8, 2),
    (4096, 1024, 2816, 8, 2),
    (256, 512, 256, 64, 8),
    (16, 512, 256, 64, 8),
    (4, 512, 1408, 8, 2),
]
CPU_CASES_QUICK = [(2048, 512, 1408, 8, 2), (256, 512, 256, 64, 8), (16, 512, 256, 64, 8)]
# GPU (design.md §7): model -> (H, F, E, k), in bf16.
GPU_MODELS = {"mixtral": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8), "h3fusion": (4096, 11008, 3, 2)}
GPU_TOKENS = (1, 128, 2048, 16384)
GPU_TOKENS_QUICK = (128, 4096)
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
# batched_mm gathers a copy of the expert weights for every (token, slot) pair; above this it is not run.
BATCHED_MM_MAX_BYTES = 1 << 30
MODES = ("fwd", "fwd+bwd", "fwd+bwd frozen")


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
    logits = F.linear(p["x"].float(), p["router"].float())  # the router runs in fp32 (design.md §2)
    return mod.topk_route(logits, p["k"])


def layer_ours(p: dict) -> torch.Tensor:
    """Router + topk_route + moe_ffn (used by benchmarks/test_bench_moe.py too)."""
    weights, experts = _route(h3fusion_ext, p)
    return h3fusion_ext.moe_ffn(p["x"], weights, experts, p["gate_up"], p["down"])


def layer_reference(p: dict) -> torch.Tensor:
    """The same layer on the plain-PyTorch oracle."""
    weights, experts = _route(reference, p)
    return reference.moe_ffn(p["x"], weights, experts, p["gate_up"], p["down"])


def hf_experts(impl: str, gate_up: torch.nn.Parameter, down: torch.nn.Parameter) -> torch.nn.Module:
    """transformers' `MixtralExperts` with `experts_implementation=impl`, holding exactly these weight Parameters."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, two_f, H = gate_up.shape
    cfg = MixtralConfig(hidden_size=H, intermediate_size=two_f // 2, num_local_experts=E)
    cfg._experts_implementation = impl
    with torch.device("meta"):  # no throwaway weights
        module = MixtralExperts(cfg)
    module.gate_up_proj, module.down_proj = gate_up, down
    return module


def batched_mm_bytes(T: int, H: int, F_: int, k: int, dtype: torch.dtype) -> int:
    """Memory of batched_mm's per-pair weight copies (gate_up + down) in one forward."""
    return T * k * 3 * F_ * H * torch.empty((), dtype=dtype).element_size()


def _steps(T, H, F_, E, k, dtype, device, mode) -> tuple[dict, dict]:
    """The timed callables of every implementation for one (case, dtype, mode), on shared weights and routing."""
    p = make_params(T, H, F_, E, k, dtype, device)
    train = mode != "fwd"
    frozen = mode == "fwd+bwd frozen"
    gate_up = torch.nn.Parameter(p["gate_up"], requires_grad=train and not frozen)
    down = torch.nn.Parameter(p["down"], requires_grad=train and not frozen)
    with torch.no_grad():
        weights, experts = _route(h3fusion_ext, p)
    x = p["x"].requires_grad_(train)
    weights = weights.to(dtype).requires_grad_(train)  # transformers keeps routing weights in the model dtype
    top_k_index = experts.long()
    leaves = [t for t in (x, weights, gate_up, down) if t.requires_grad]

    def ours():
        return h3fusion_ext.moe_ffn(x, weights, experts, gate_up, down)

    fns = {"ours": ours}
    for impl in HF_IMPLS:
        if impl == "batched_mm" and batched_mm_bytes(T, H, F_, k, dtype) * (2 if train else 1) > BATCHED_MM_MAX_BYTES:
            continue
        module = hf_experts(impl, gate_up, down)
        fns[impl] = lambda m=module: m(x, top_k_index, weights)

    def wrap(fn):
        if not train:

            def run_fwd():
                with torch.no_grad():
                    return fn()

            return run_fwd

        def run_bwd():
            y = fn()
            return torch.autograd.grad(y, leaves, torch.ones_like(y))

        return run_bwd

    return {name: wrap(fn) for name, fn in fns.items()}, p


def flops(T: int, H: int, F_: int, k: int, mode: str) -> float:
    """Expert GEMM FLOPs: 6*T*k*H*F forward; backward 2x that, or 1x with frozen expert weights."""
    fwd = 6.0 * T * k * H * F_
    return fwd * {"fwd": 1.0, "fwd+bwd": 3.0, "fwd+bwd frozen": 2.0}[mode]


def dense_mm_step(T: int, H: int, F_: int, k: int, dtype: torch.dtype, device: str):
    """A plain dense `mm` of the layer's largest GEMM as one matrix: [T*k, H] @ [H, 2F]; returns (fn, flops)."""
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(T * k, H, device=device, generator=g).to(dtype)
    w = torch.randn(2 * F_, H, device=device, generator=g).to(dtype)
    return (lambda: torch.mm(a, w.t())), 2.0 * T * k * H * 2 * F_


def as_fp32_words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor seen as fp32 words where they can be (2-byte dtypes with an even last
    dimension; others as they are), so that a `sum` over them reads at the memory's rate whatever the weights' dtype:
    a bf16 `sum` widens every element and measured 15-18% below an fp32 `sum` of the same bytes (28 MiB, 2 threads,
    AVX2 EPYC, medians of 200 interleaved calls: 21.6-22.3 against 25.3-26.6 GB/s), which would flatter bf16 rows."""
    if t.element_size() == 2 and t.is_contiguous() and t.shape[-1] % 2 == 0:
        return t.view(torch.float32)
    return t


def weights_read_step(p: dict):
    """A plain `sum` over the bytes of the experts the routing uses (the forward's unavoidable reads at decode
    sizes), read as fp32 words (`as_fp32_words`) from one contiguous copy of them in one call; returns (fn, bytes
    read, experts' bytes of all E experts). One call, because the memory's rate is the limit this measures: a `sum`
    per expert (14 calls at T4 E8 k2) pays a parallel region's start-up and ramp 14 times and measured 17.0 GB/s
    where one `sum` over the same bytes read 25.2 GB/s (bf16 H512 F1408, 2 threads, AVX2 EPYC, medians of 200
    interleaved calls), about what a hand-written AVX2 read with prefetches reaches on that machine (22-27 GB/s)."""
    with torch.no_grad():
        _, experts = _route(h3fusion_ext, p)
    active = sorted(set(experts.flatten().tolist()))
    gate_up, down = p["gate_up"], p["down"]
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    # concatenated in the weights' dtype, then seen as words once: per-part views would mix fp32 and bf16 (and cat
    # would widen the bf16 parts) wherever only one of H, F is odd
    words = as_fp32_words(torch.cat([w[e].reshape(-1) for e in active for w in (gate_up, down)]))

    def read():
        return words.sum()

    return read, len(active) * expert_bytes, gate_up.shape[0] * expert_bytes


def unavoidable_bytes(active_bytes: int, all_bytes: int, mode: str) -> int:
    """Bytes a layer must move (weights and weight gradients only): the active experts' weights read in the forward
    and again in the backward, and with weight gradients one for every expert, written once."""
    return {"fwd": active_bytes, "fwd+bwd frozen": 2 * active_bytes, "fwd+bwd": 2 * active_bytes + all_bytes}[mode]


def _cases(device: str, quick: bool):
    if not device.startswith("cuda"):
        for T, H, F_, E, k in CPU_CASES_QUICK if quick else CPU_CASES:
            for dtype in (torch.float32, torch.bfloat16):
                yield f"T{T}-H{H}-F{F_}-E{E}-k{k}", T, H, F_, E, k, dtype
        return
    for model, (H, F_, E, k) in GPU_MODELS.items():
        for T in GPU_TOKENS_QUICK if quick else GPU_TOKENS:
            yield f"{model} T={T}", T, H, F_, E, k, torch.bfloat16


def collect(device: str, quick: bool, case_filter: str = "") -> list[dict]:
    """Rows: bench, case, dtype, mode, <impl>_ms for ours and each transformers implementation, vs_best,
    pct_of_dense, ours_gflops, dense_gflops, pct_of_memory, ours_gbps, read_gbps, peak_mem_mb / eager_peak_mem_mb
    (fwd rows), plus the shape."""
    rows: list[dict] = []
    on_gpu = device.startswith("cuda")
    budget = 1.0 if on_gpu else (4.0 if quick else 8.0)
    # Up to 21 calls where the budget allows (calls under ~0.3 s): at T256 H512 F256 E64 k8 fp32 a call's time spread
    # +-15% (q20-q80) on a shared 2-core host, so a median of 9 moved the ratio to grouped_mm by about +-7%.
    repeats = 5 if quick else 21
    # The largest CPU shapes take seconds per call, so the budget alone would stop them at 3 calls; on a shared
    # machine a median of 3 moved vs-best by +-10% between runs, so full runs take at least 5 (about a minute more).
    min_repeats = 3 if quick or on_gpu else 5
    # transformers' bf16 backward on a CPU without bf16 dot products: 21 s a call at T2048 (see time_interleaved)
    single_call_s = None if on_gpu else 10.0
    for case, T, H, F_, E, k, dtype in _cases(device, quick):
        if case_filter and case_filter not in case:
            continue
        dense_fn, dense_flops = dense_mm_step(T, H, F_, k, dtype, device)
        read_fn, active_bytes, all_bytes = weights_read_step(make_params(T, H, F_, E, k, dtype, device))
        for mode in MODES:
            fns, _p = _steps(T, H, F_, E, k, dtype, device, mode)
            # the dense mm runs interleaved with every mode's calls, so each row's fraction of it comes from the same
            # minutes of the machine (on a shared host the same mm measured 220-400 GFLOP/s a few minutes apart)
            fns["dense_mm"] = dense_fn
            fns["weights_read"] = read_fn
            timings = time_interleaved(
                fns,
                device,
                warmup=2,
                repeats=repeats,
                budget_s=budget,
                min_repeats=min_repeats,
                single_call_s=single_call_s,
            )
            dense = timings.pop("dense_mm")
            dense_rate = dense_flops / (dense["median_ms"] * 1e-3) if isinstance(dense, dict) else None
            read = timings.pop("weights_read")
            read_rate = active_bytes / (read["median_ms"] * 1e-3) if isinstance(read, dict) else None
            row = {"bench": "moe", "case": case, "dtype": str(dtype).split(".")[-1], "mode": mode}
            row.update({"T": T, "H": H, "F": F_, "E": E, "k": k})
            errors = []
            for impl in ("ours",) + HF_IMPLS:
                t = timings.get(impl)
                if t is None:
                    row[f"{impl}_ms"] = "skipped (memory)"
                elif isinstance(t, Exception):
                    errors.append(f"{impl}: {type(t).__name__}: {str(t).splitlines()[0][:120]}")
                else:
                    row[f"{impl}_ms"] = t["median_ms"]
                    if t.get("single_call"):
                        row.setdefault("single_call", []).append(impl)
            others = [row[f"{i}_ms"] for i in HF_IMPLS if isinstance(row.get(f"{i}_ms"), float)]
            ours_ms = row.get("ours_ms")
            if isinstance(ours_ms, float):
                rate = flops(T, H, F_, k, mode) / (ours_ms * 1e-3)
                row["ours_gflops"] = rate / 1e9
                if others:
                    row["vs_best"] = min(others) / ours_ms
                if dense_rate:
                    row["dense_gflops"] = dense_rate / 1e9
                    row["pct_of_dense"] = 100.0 * rate / dense_rate
                if read_rate:
                    bytes_rate = unavoidable_bytes(active_bytes, all_bytes, mode) / (ours_ms * 1e-3)
                    row["ours_gbps"] = bytes_rate / 1e9
                    row["read_gbps"] = read_rate / 1e9
                    row["pct_of_memory"] = 100.0 * bytes_rate / read_rate
            if mode == "fwd":
                for impl in ("ours", "eager"):
                    if impl in fns:
                        key = "peak_mem_mb" if impl == "ours" else "eager_peak_mem_mb"
                        row[key] = peak_memory_mb(fns[impl], device)
            if errors:
                row["error"] = "; ".join(errors)
            rows.append(row)
            del fns, _p
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


TABLE_COLUMNS = [
    "case", "dtype", "mode", "ours_ms", "eager_ms", "grouped_mm_ms", "batched_mm_ms", "vs_best", "pct_of_dense",
    "pct_of_memory", "peak_mem_mb", "eager_peak_mem_mb", "error",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="moe_ffn vs transformers' experts implementations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = collect(args.device, args.quick, args.case)
    print(format_table(rows, [c for c in TABLE_COLUMNS if any(c in r for r in rows)]))


if __name__ == "__main__":
    main()
