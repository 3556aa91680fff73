"""Benchmark runner: `python -m h3fusion.bench [--device cpu|cuda] [--quick] [--only moe,logprob] [--out f.json]`.

Each bench module exposes `collect(device: str, quick: bool) -> list[dict]`; the runner prints one table per bench
and writes every row to JSON with the device, torch version and date. On CUDA it first measures the device ceiling
(a large bf16 matmul, a device-to-device copy) and adds `pct_of_ceiling` to rows that report TFLOP/s or GB/s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys

import torch

from h3fusion.utils.files import OutputDirError, atomic_write_json, check_output_file

from .common import device_name, format_table, measure_ceiling

BENCH_MODULES = {
    "moe": "h3fusion.bench.moe_bench",
    "logprob": "h3fusion.bench.logprob_bench",
    "hf_moe": "h3fusion.bench.hf_moe_bench",
    "lora": "h3fusion.bench.lora_bench",
    "fusion": "h3fusion.bench.fusion_bench",  # writes GBs of checkpoints: run only when named (--only fusion)
}
DEFAULT_BENCHES = ["moe", "logprob", "hf_moe", "lora"]
COLUMNS = [
    "case",
    "impl",
    "dtype",
    "mode",
    "ours_ms",
    "eager_ms",
    "grouped_mm_ms",
    "batched_mm_ms",
    "vs_best",
    "pct_of_dense",
    "pct_of_memory",
    "median_ms",
    "tflops",
    "gbps",
    "pct_of_ceiling",
    "peak_mem_mb",
    "eager_peak_mem_mb",
    "speedup_vs_reference",
    "speedup_vs_eager",
    "time_vs_materialized",
    "mem_vs_materialized",
    "weight_mem_mb",
    "speedup_vs_peft",
    "mem_vs_peft",
    "max_abs_diff",
    "error",
]


def build_parser() -> argparse.ArgumentParser:
    """`python -m h3fusion.bench`: the flags of `h3fusion bench` (defined once, in h3fusion.bench.arguments)."""
    from .arguments import add_arguments

    parser = argparse.ArgumentParser(prog="python -m h3fusion.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def _add_ceiling_pct(rows: list[dict], ceiling: dict[str, float]) -> None:
    for r in rows:
        if r.get("tflops") and ceiling.get("matmul_bf16_tflops"):
            r["pct_of_ceiling"] = 100.0 * r["tflops"] / ceiling["matmul_bf16_tflops"]
        elif r.get("gbps") and ceiling.get("copy_gbps"):
            r["pct_of_ceiling"] = 100.0 * r["gbps"] / ceiling["copy_gbps"]


def run(args: argparse.Namespace) -> int:
    """Run the benches named by `args.only` (default all) on `args.device` (default: cuda when available)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    names = [n for n in DEFAULT_BENCHES if n in BENCH_MODULES] if args.only is None else args.only
    unknown = [n for n in names if n not in BENCH_MODULES]
    if unknown:
        print(f"error: unknown bench {unknown}; choose from {sorted(BENCH_MODULES)}", file=sys.stderr)
        return 2
    try:  # before the benches run, not after (a bad --out would lose the results)
        check_output_file(args.out, "--out")
    except OutputDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or (2 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    ceiling = measure_ceiling(args.device)
    report = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "ceiling": ceiling,
        "results": {},
    }
    print(f"device: {report['device']}   torch {report['torch']}   {report['date']}")
    if ceiling:
        print("ceiling: " + ", ".join(f"{k} = {v:.1f}" for k, v in ceiling.items()))
    failed: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(BENCH_MODULES[name])
            rows = module.collect(args.device, args.quick)
        except Exception as exc:  # one broken bench (e.g. a missing optional dependency) must not lose the others
            if isinstance(exc, ModuleNotFoundError) and exc.name == BENCH_MODULES[name]:
                print(f"\n[{name}] skipped: {BENCH_MODULES[name]} is not present")
                continue
            print(f"\n[{name}] failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            report["results"][name] = [{"bench": name, "error": f"{type(exc).__name__}: {exc}"}]
            failed.append(name)
            continue
        _add_ceiling_pct(rows, ceiling)
        report["results"][name] = rows
        columns = [c for c in getattr(module, "COLUMNS", COLUMNS) if any(c in r for r in rows)]
        print(f"\n[{name}]\n" + format_table(rows, columns))
        _write_json(report, args.out)  # after every bench, so a run cut short by a time limit keeps what it measured
    _write_json(report, args.out)
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


def _write_json(report: dict, path: str) -> None:
    atomic_write_json(path, report, indent=1)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
