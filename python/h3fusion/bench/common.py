"""Shared benchmark helpers: timing (warmup + median), peak memory, FLOP counts, device ceilings, tables.

Peak memory is measured in a separate, untimed call:
  * CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what was allocated before.
  * CPU: the allocation records of `torch.profiler` (profile_memory=True): each record carries the running total of
    bytes held by torch's CPU allocator since profiling started, so the peak of that total is the most memory the
    call held at once beyond what existed before it (inputs and weights excluded, outputs and autograd buffers
    included). tracemalloc and ru_maxrss cannot see or isolate torch's allocations, so they are not used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 10, budget_s: float = 5.0
) -> dict[str, float]:
    """Median wall time of `fn()` in ms over up to `repeats` calls (at least 3, fewer beyond `budget_s` seconds).

    Returns:
        {"median_ms", "q20_ms", "q80_ms", "repeats"}.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start_all < budget_s):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "q20_ms": qs[0], "q80_ms": qs[3], "repeats": len(times)}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str,
    *,
    warmup: int = 2,
    repeats: int = 10,
    budget_s: float = 5.0,
    min_repeats: int = 3,
    single_call_s: float | None = None,
    slow_factor: float | None = 10.0,
) -> dict[str, dict[str, float] | Exception]:
    """`time_fn` for several implementations at once, alternating them call by call.

    On a shared machine the load drifts over seconds; alternating makes every implementation see the same drift,
    so their ratio (the speedup) stays meaningful even when absolute times do not. An implementation that raises is
    dropped and its exception returned in its place. Every implementation gets at least `min_repeats` timed calls,
    more while the calls of those still alternating have taken under `budget_s` seconds, at most `repeats`. After
    `min_repeats` rounds, one whose median is over `slow_factor` times the fastest's stops alternating (its times so
    far stand; it cannot be the fastest): at T256 H512 F256 E64 k8 fp32 fwd+bwd on 2 CPU cores the eager loop took
    3.1 s a call, so its calls alone spent the budget and ours (51 ms) and grouped_mm (82 ms) got 5 calls each, whose
    median moved their ratio by +-20% between runs. One whose first warm-up call takes longer than
    `single_call_s` seconds is timed by that call alone (`repeats` 1, `single_call` True): on a CPU without bf16
    dot products transformers' bf16 backward took 21 s a call at T2048 H512 F1408, 30-60x ours, and repeating such
    calls would have taken the run past an hour for a ratio that one call already settles.
    """
    live: dict[str, Callable[[], object]] = {}
    result: dict[str, dict[str, float] | Exception] = {}
    for name, fn in fns.items():
        try:
            for i in range(warmup):
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                first_ms = (time.perf_counter() - t0) * 1e3
                if i == 0 and single_call_s is not None and first_ms > single_call_s * 1e3:
                    result[name] = {"median_ms": first_ms, "q20_ms": first_ms, "q80_ms": first_ms, "repeats": 1}
                    result[name]["single_call"] = True
                    break
            else:
                live[name] = fn
        except Exception as exc:  # noqa: BLE001 - reported per implementation
            result[name] = exc
    times: dict[str, list[float]] = {name: [] for name in live}

    def spent_s() -> float:  # in the calls of the implementations still alternating
        return sum(sum(times[name]) for name in live) * 1e-3

    rep = 0
    while live and rep < repeats and (rep < min_repeats or spent_s() < budget_s):
        for name, fn in list(live.items()):
            synchronize(device)
            t0 = time.perf_counter()
            try:
                fn()
                synchronize(device)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at one size: drop this implementation
                result[name] = exc
                del live[name], times[name]
                continue
            times[name].append((time.perf_counter() - t0) * 1e3)
        rep += 1
        if rep >= min_repeats and slow_factor is not None and live:
            fastest = min(statistics.median(times[name]) for name in live)
            for name in [n for n in live if statistics.median(times[n]) > slow_factor * fastest]:
                del live[name]
    for name, ts in times.items():
        qs = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        result[name] = {"median_ms": statistics.median(ts), "q20_ms": qs[0], "q80_ms": qs[3], "repeats": len(ts)}
    return result


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory held during one call of `fn()` beyond what was allocated before it, in MiB (see module doc)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The running sum of every CPU allocation and free in time order: correct with several reporters (PyTorch's CPU
    # allocator and h3fusion_ext's cache of large blocks each report their own running totals).
    deltas = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            deltas.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    peak = held = 0
    for _, delta in sorted(deltas):
        held += delta
        peak = max(peak, held)
    return peak / 2**20


def moe_flops(T: int, H: int, F: int, E: int, k: int, backward: bool) -> float:
    """Matmul FLOPs of one MoE layer (router + expert FFN); backward costs twice the forward."""
    fwd = 2.0 * T * H * E + 6.0 * T * k * F * H
    return fwd * (3.0 if backward else 1.0)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        model = platform.processor() or "cpu"
    # The vector ISA torch's kernels use (AVX2 / AVX512 / ...): one model name covers CPUs with and without AVX-512,
    # on which the same op differs several-fold (bf16 GEMMs above all).
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "unknown ISA"
    return f"{model} ({torch.get_num_threads()} threads, {isa})"


def measure_ceiling(device: str) -> dict[str, float]:
    """The device's practical ceiling: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s). CUDA only."""
    if not device.startswith("cuda"):
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = time_fn(lambda: a @ b, device, warmup=3, repeats=20)["median_ms"]
    src = torch.empty(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    cp = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=20)["median_ms"]
    return {
        "matmul_bf16_tflops": 2 * n**3 / (mm * 1e-3) / 1e12,
        "copy_gbps": 2 * src.numel() * src.element_size() / (cp * 1e-3) / 1e9,  # read + write
    }


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of `columns` (missing values print as '-')."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
