"""Benchmark: linear_logprob (chunked, ours) vs the materialised path (logits -> log_softmax -> gather).

Rows (dicts) carry bench="linear_logprob", case (shape), impl ("ours" | "materialized"), mode ("fwd" | "fwd+bwd"),
median_ms, peak_mem_mb, and on our rows time_vs_materialized and mem_vs_materialized (ours / materialised).

Shapes: CPU N=4096, H=512, V=32000 fp32; GPU N=16384, H=4096, V=128256 bf16 (a Llama-3 vocabulary).

Peak memory is the memory allocated above what existed before the measured call (the inputs, and for fwd+bwd also
nothing else: gradients are cleared first):
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocation before the call.
  * CPU: the running total of every allocation and free that PyTorch's CPU allocator reports to the profiler
    (torch.profiler with profile_memory=True, raw [memory] events in time order); its maximum is the peak.
    Allocations inside BLAS (MKL/OpenBLAS packing buffers) are not seen, for either implementation.
Timing: median wall-clock of repeated runs (CUDA: with synchronisation around each run), after a warm-up, ours and
the materialised path alternating within each repetition. On the
CPU without --quick, also cpu_time_ms: the median CPU time of the calling thread with torch.set_num_threads(1), which
other processes sharing the cores do not inflate (wall-clock on a shared 2-core machine varies by +-20%); our rows
then carry cpu_time_vs_materialized too.

Run alone: ``python -m h3fusion.bench.logprob_bench --device cpu`` (prints a table; ``--json PATH`` writes the rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from h3fusion.utils.files import atomic_write_json, check_output_file

from .common import synchronize

BENCH = "linear_logprob"
IGNORE = -100


def _materialized(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: full [N, V] logits, fp32 log_softmax, gather; ignored rows give 0."""
    logits = (hidden @ weight.T).float()
    valid = targets != IGNORE
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def _ours(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from h3fusion_ext import linear_logprob

    return linear_logprob(hidden, weight, targets, ignore_index=IGNORE)


def _make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) / h**0.25).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.25).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::17] = IGNORE
    return hidden, weight, targets.to(device)


def _step(fn, hidden, weight, targets, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            fn(hidden, weight, targets)
        return
    hidden.grad = None
    weight.grad = None
    fn(hidden, weight, targets).sum().backward()


def _median_ms(fns: dict, args, mode: str, device: str, reps: int) -> dict:
    """Median wall-clock ms per implementation; the implementations alternate within each repetition so that load
    from other processes (a shared machine) hits both alike."""
    for fn in fns.values():
        _step(fn, *args, mode)  # warm-up
    synchronize(device)
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            _step(fn, *args, mode)
            synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _thread_cpu_ms(fn, args, mode: str, reps: int) -> float:
    """Median CPU time of the calling thread with one intra-op thread: immune to other processes sharing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _step(fn, *args, mode)
        times = []
        for _ in range(reps):
            t0 = time.thread_time()
            _step(fn, *args, mode)
            times.append((time.thread_time() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _peak_mb_cuda(fn, args, mode: str) -> float:
    torch.cuda.synchronize()
    hidden, weight = args[0], args[1]
    hidden.grad = None
    weight.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, *args, mode)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _peak_mb_cpu(fn, args, mode: str) -> float:
    from torch.profiler import ProfilerActivity, profile

    hidden, weight = args[0], args[1]
    hidden.grad = None
    weight.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(fn, *args, mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def _case(device: str) -> tuple[int, int, int, torch.dtype]:
    if device.startswith("cuda"):
        return 16384, 4096, 128256, torch.bfloat16
    return 4096, 512, 32000, torch.float32


def collect(device: str, quick: bool) -> list[dict]:
    """Time and peak memory of ours vs the materialised path, forward and forward+backward.

    Args:
        device: "cpu" or "cuda" (or "cuda:i").
        quick: fewer repetitions.

    Returns:
        One dict per (impl, mode); see the module docstring for the keys.
    """
    n, h, v, dtype = _case(device)
    reps = 3 if quick else (5 if device == "cpu" else 20)
    case = f"N={n},H={h},V={v},{str(dtype).replace('torch.', '')}"
    hidden, weight, targets = _make_inputs(n, h, v, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    args = (hidden, weight, targets)
    peak = _peak_mb_cuda if device.startswith("cuda") else _peak_mb_cpu
    rows = []
    impls = {"materialized": _materialized, "ours": _ours}
    for mode in ("fwd", "fwd+bwd"):
        medians = _median_ms(impls, args, mode, device, reps)
        for impl, fn in impls.items():
            row = {
                "bench": BENCH,
                "case": case,
                "impl": impl,
                "mode": mode,
                "device": device,
                "median_ms": round(medians[impl], 3),
                "peak_mem_mb": round(peak(fn, args, mode), 1),
            }
            if device == "cpu" and not quick:
                row["cpu_time_ms"] = round(_thread_cpu_ms(fn, args, mode, reps), 3)
            rows.append(row)
        ref, ours = rows[-2], rows[-1]
        ours["time_vs_materialized"] = round(ours["median_ms"] / ref["median_ms"], 3)
        ours["mem_vs_materialized"] = round(ours["peak_mem_mb"] / ref["peak_mem_mb"], 3) if ref["peak_mem_mb"] else None
        if "cpu_time_ms" in ours:
            ours["cpu_time_vs_materialized"] = round(ours["cpu_time_ms"] / ref["cpu_time_ms"], 3)
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = ["case", "mode", "impl", "median_ms", "peak_mem_mb", "time_vs_materialized", "mem_vs_materialized"]
    cols += [c for c in ("cpu_time_ms", "cpu_time_vs_materialized") if any(c in r for r in rows)]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")  # before the run, not after it
    rows = collect(args.device, args.quick)
    _print_table(rows)
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
