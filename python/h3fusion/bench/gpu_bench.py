"""GPU benchmark of the MoE expert FFN: both CUDA GEMM backends vs transformers' grouped_mm and a dense mm.

moe_ffn under the "own" and "torch" GEMM backends against transformers' `grouped_mm` experts and a dense bf16 `mm`
of the same FLOPs, forward and forward+backward; and a torch.profiler kernel table.

Usage: `python -m h3fusion.bench.gpu_bench --out bench.json [--quick] [--budget-s 150] [--profile profile.txt]`.
The JSON is rewritten after every case, so a run cut short keeps what it measured. Rows: bench="gpu_moe", case,
impl ("ours-own" | "ours-torch" | "hf-grouped_mm" | "dense-mm"), mode ("fwd" | "fwd+bwd"), median_ms, min_ms,
tflops (FLOPs = 6·T·k·H·F forward, 3x that for fwd+bwd), pct_of_dense, speedup_vs_hf, peak_mem_mb, backend (which
GEMM backend `moe_ffn` reported), error (instead of timings when an implementation failed at that size).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import h3fusion_ext

# model -> (H, F, E, k); all bf16.
MODELS = {"mixtral": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8), "h3fusion": (4096, 11008, 3, 2)}
CASES = [("mixtral", 512), ("mixtral", 4096), ("qwen3-30b-a3b", 4096), ("h3fusion", 4096), ("mixtral", 16384)]
CASES_QUICK = [("mixtral", 4096), ("qwen3-30b-a3b", 4096)]
DTYPE = torch.bfloat16


def expert_flops(T: int, H: int, F_: int, k: int, backward: bool) -> float:
    """Matmul FLOPs of the expert FFN (gate/up and down projections); backward costs twice the forward."""
    return 6.0 * T * k * H * F_ * (3.0 if backward else 1.0)


def make_case(T: int, H: int, F_: int, E: int, k: int, train: bool) -> dict:
    """Random bf16 inputs at a realistic scale, routed by our topk_route on fp32 router logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, H, device="cuda", generator=g).to(DTYPE)
    router = torch.randn(E, H, device="cuda", generator=g) / H**0.5
    weights, experts = h3fusion_ext.topk_route(F.linear(x.float(), router), k)
    case = {
        "x": x,
        "weights": weights,
        "experts": experts,
        "gate_up": (torch.randn(E, 2 * F_, H, device="cuda", generator=g) / H**0.5).to(DTYPE),
        "down": (torch.randn(E, H, F_, device="cuda", generator=g) / F_**0.5).to(DTYPE),
    }
    for name in ("x", "weights", "gate_up", "down"):
        case[name].requires_grad_(train)
    return case


def ours(c: dict) -> Callable[[], torch.Tensor]:
    return lambda: h3fusion_ext.moe_ffn(c["x"], c["weights"], c["experts"], c["gate_up"], c["down"])


def hf_grouped_mm(c: dict) -> Callable[[], torch.Tensor]:
    """transformers' MixtralExperts with experts_implementation="grouped_mm", sharing our weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, two_f, H = c["gate_up"].shape
    cfg = MixtralConfig(hidden_size=H, intermediate_size=two_f // 2, num_local_experts=E)
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):  # no host-side weight allocation; the parameters below share our tensors
        module = MixtralExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(c["gate_up"], requires_grad=c["gate_up"].requires_grad)
    module.down_proj = torch.nn.Parameter(c["down"], requires_grad=c["down"].requires_grad)
    index = c["experts"].long()
    return lambda: module(c["x"], index, c["weights"].to(DTYPE))


def dense_mm(T: int, H: int, F_: int, k: int, train: bool) -> Callable[[], torch.Tensor]:
    """Two plain GEMMs with the expert FFN's FLOPs: [T*k, H] x [H, 2F], then half of that x [F, H]."""
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(T * k, H, device="cuda", generator=g).to(DTYPE).requires_grad_(train)
    w1 = (torch.randn(H, 2 * F_, device="cuda", generator=g) / H**0.5).to(DTYPE).requires_grad_(train)
    w2 = (torch.randn(F_, H, device="cuda", generator=g) / F_**0.5).to(DTYPE).requires_grad_(train)
    return lambda: (a @ w1)[:, :F_] @ w2


def step(forward: Callable[[], torch.Tensor], train: bool, gemm_mode: str | None = None) -> Callable[[], object]:
    """One timed call: forward (no autograd), or forward and backward; under `gemm_mode` for our moe_ffn."""

    def run():
        with h3fusion_ext.moe_ffn_gemm_mode(gemm_mode) if gemm_mode else contextlib.nullcontext():
            if not train:
                with torch.no_grad():
                    return forward()
            y = forward()
            y.backward(torch.ones_like(y))
            return None

    return run


def time_cuda(fns: dict[str, Callable[[], object]], warmup: int, reps: int, budget_s: float) -> dict:
    """CUDA-event times (ms) of each fn, interleaved call by call; an fn that raises gets its exception instead."""
    result: dict = {}
    live: dict = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            live[name] = fn
        except Exception as exc:  # noqa: BLE001 - reported per implementation (e.g. out of memory)
            result[name] = exc
            torch.cuda.empty_cache()
    times: dict = {name: [] for name in live}
    start_all = time.perf_counter()
    for rep in range(reps):
        for name, fn in list(live.items()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                start.record()
                fn()
                end.record()
                end.synchronize()
            except Exception as exc:  # noqa: BLE001
                result[name] = exc
                del live[name], times[name]
                continue
            times[name].append(start.elapsed_time(end))
        if rep >= 2 and time.perf_counter() - start_all > budget_s:
            break
    for name, ts in times.items():
        result[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "repeats": len(ts)}
    return result


def peak_mem_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(model: str, T: int, quick: bool) -> list[dict]:
    H, F_, E, k = MODELS[model]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        train = mode != "fwd"
        c = make_case(T, H, F_, E, k, train)
        fns = {
            "ours-own": step(ours(c), train, "own"),
            "ours-torch": step(ours(c), train, "torch"),
            "hf-grouped_mm": step(hf_grouped_mm(c), train),
            "dense-mm": step(dense_mm(T, H, F_, k, train), train),
        }
        timings = time_cuda(fns, warmup=1 if quick else 2, reps=5 if quick else 10, budget_s=4.0 if quick else 8.0)
        case_rows = []
        for impl, fn in fns.items():
            row = {"bench": "gpu_moe", "case": f"{model} T={T}", "impl": impl, "mode": mode, "dtype": "bfloat16"}
            row.update(T=T, H=H, F=F_, E=E, k=k)
            timing = timings[impl]
            if isinstance(timing, Exception):
                row["error"] = f"{type(timing).__name__}: {str(timing).splitlines()[0][:200]}"
            else:
                row.update(timing)
                row["tflops"] = expert_flops(T, H, F_, k, train) / (timing["median_ms"] * 1e-3) / 1e12
                row["peak_mem_mb"] = peak_mem_mb(fn)
                if impl.startswith("ours"):
                    row["backend"] = h3fusion_ext.moe_ffn_backend()
            case_rows.append(row)
        by_impl = {r["impl"]: r for r in case_rows}
        for r in case_rows:
            if r.get("tflops") and by_impl["dense-mm"].get("tflops"):
                r["pct_of_dense"] = 100.0 * r["tflops"] / by_impl["dense-mm"]["tflops"]
            if r.get("median_ms") and by_impl["hf-grouped_mm"].get("median_ms"):
                r["speedup_vs_hf"] = by_impl["hf-grouped_mm"]["median_ms"] / r["median_ms"]
        rows += case_rows
        del c, fns
        torch.cuda.empty_cache()
    return rows


def kernel_table(prof, limit: int = 20) -> str:
    """The `limit` CUDA kernels with the most device time, as a fixed-width table."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    kernels.sort(key=device_us, reverse=True)
    total = sum(device_us(e) for e in kernels) or 1.0
    lines = [f"{'device ms':>10} {'%':>6} {'calls':>6} {'avg us':>9}  kernel"]
    for e in kernels[:limit]:
        us, name = device_us(e), e.key[:150]
        lines.append(f"{us / 1e3:10.3f} {100 * us / total:6.1f} {e.count:6d} {us / max(e.count, 1):9.1f}  {name}")
    lines.append(f"{total / 1e3:10.3f} {100.0:6.1f} {'':6} {'':9}  (all kernels)")
    return "\n".join(lines)


def profile(path: str, T: int = 4096) -> None:
    """One Mixtral-shape forward+backward per GEMM backend under torch.profiler; top-20 kernel tables to `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    H, F_, E, k = MODELS["mixtral"]
    c = make_case(T, H, F_, E, k, train=True)
    parts = [f"torch.profiler, mixtral T={T} H={H} F={F_} E={E} k={k} bf16, one forward+backward of moe_ffn\n"]
    for mode in ("torch", "own"):
        run = step(ours(c), train=True, gemm_mode=mode)
        try:
            run()  # warm-up (CUTLASS/cuBLAS initialisation, allocator)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            parts.append(f"== backend {mode} (ran: {h3fusion_ext.moe_ffn_backend()})\n{kernel_table(prof)}\n")
        except Exception as exc:  # noqa: BLE001 - the other backend's table is still useful
            parts.append(f"== backend {mode}: failed: {type(exc).__name__}: {exc}\n")
    from h3fusion.utils.files import atomic_write_text

    atomic_write_text(path, "\n".join(parts))
    print("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h3fusion.bench.gpu_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_bench.json", help="JSON output path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="two cases, fewer repeats")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    parser.add_argument("--profile", default=None, help="write the profiler kernel tables here instead of timing")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and h3fusion_ext.has_cuda_kernels()):
        print("error: needs an NVIDIA GPU and a CUDA build of h3fusion_ext", file=sys.stderr)
        return 2
    if args.profile:
        profile(args.profile)
        return 0
    import transformers

    from h3fusion.utils.files import atomic_write_json

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "rows": [],
    }
    start = time.perf_counter()
    for model, T in CASES_QUICK if args.quick else CASES:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f}s spent: skipping {model} T={T}")
            continue
        rows = bench_case(model, T, args.quick)
        report["rows"] += rows
        atomic_write_json(args.out, report)  # after every case: a run cut short keeps what it measured
        for r in rows:
            timing = f"{r['median_ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s" if "median_ms" in r else r["error"]
            extra = f" {r.get('pct_of_dense', 0):5.1f}% dense, x{r.get('speedup_vs_hf', 0):.2f} vs hf"
            print(f"{r['case']:<22} {r['mode']:<8} {r['impl']:<14} {timing}{extra if 'median_ms' in r else ''}")
    atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
