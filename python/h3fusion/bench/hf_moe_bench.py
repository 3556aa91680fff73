"""Whole-model benchmark: a tiny Mixtral with experts_implementation="h3fusion" against transformers' own experts
implementations (eager, grouped_mm, batched_mm) on the same weights.

`collect(device, quick)` returns rows {bench, case, impl, mode, median_ms, speedup_vs_eager, vs_best, ...} for the
runner (`h3fusion bench`); `python -m h3fusion.bench.hf_moe_bench [--device cpu] [--quick]` prints them on their own.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

BATCHED_MM_MAX_BYTES = 1 << 30  # batched_mm is left out above this much per-pair weight copies
CASE = dict(hidden=256, intermediate=512, layers=4, experts=8, top_k=2, vocab=1024, seq=256, batch=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fns: dict, device: str, warmup: int, reps: int) -> dict:
    """Median wall time in milliseconds of each fn() (synchronised on CUDA).

    The functions run interleaved, one round at a time, so a busy shared machine slows all of them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _model(impl: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    import h3fusion  # noqa: F401  (registers "h3fusion" in transformers' experts interface)

    cfg = MixtralConfig(
        vocab_size=CASE["vocab"],
        hidden_size=CASE["hidden"],
        intermediate_size=CASE["intermediate"],
        num_hidden_layers=CASE["layers"],
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=CASE["experts"],
        num_experts_per_tok=CASE["top_k"],
        max_position_embeddings=2 * CASE["seq"],
    )
    cfg._experts_implementation = impl
    torch.manual_seed(seed)  # both implementations get the same weights
    model = MixtralForCausalLM(cfg).to(device=device, dtype=dtype)
    assert model.config._experts_implementation == impl
    return model


def collect(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Time forward and forward+backward of the tiny Mixtral for both experts implementations.

    Args:
        device: "cpu" or "cuda".
        quick: fewer repetitions (for CI smoke runs).

    Returns:
        One row per (impl, mode): bench="hf_moe", case, impl ("h3fusion" | "eager" | "grouped_mm" | "batched_mm"),
        mode ("fwd" | "fwd+bwd"), median_ms, speedup_vs_eager, vs_best (the fastest transformers implementation's
        time / this one's), plus device, dtype and tokens.
    """
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    warmup, reps = (1, 3) if quick else (3, 10)
    case = "mixtral-h{hidden}-f{intermediate}-l{layers}-e{experts}-k{top_k}-s{seq}".format(**CASE)
    ids = torch.randint(0, CASE["vocab"], (CASE["batch"], CASE["seq"]), device=device)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    impls = ["eager", "grouped_mm", "batched_mm", "h3fusion"]
    # batched_mm copies the expert weights for every (token, slot) pair and keeps them for the backward of every layer.
    elem = torch.empty((), dtype=dtype).element_size()
    pairs = CASE["batch"] * CASE["seq"] * CASE["top_k"]
    if pairs * 3 * CASE["intermediate"] * CASE["hidden"] * elem * CASE["layers"] > BATCHED_MM_MAX_BYTES:
        impls.remove("batched_mm")
    models = {impl: _model(impl, device, dtype, seed) for impl in impls}

    def fwd(model):
        with torch.no_grad():
            model(ids)

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    rows: list[dict] = []
    for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        fns = {impl: (lambda m=m, step=step: step(m)) for impl, m in models.items()}
        ms = _median_ms(fns, device, warmup, reps)
        best_hf = min(ms[impl] for impl in models if impl != "h3fusion")
        for impl in models:
            rows.append(
                dict(
                    bench="hf_moe",
                    case=case,
                    impl=impl,
                    mode=mode,
                    median_ms=round(ms[impl], 3),
                    speedup_vs_eager=round(ms["eager"] / ms[impl], 3),
                    vs_best=round(best_hf / ms[impl], 3),
                    device=device,
                    dtype=str(dtype).replace("torch.", ""),
                    tokens=CASE["batch"] * CASE["seq"],
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = collect(args.device, args.quick)
    print(f"{'case':<40} {'impl':<10} {'mode':<8} {'median ms':>10} {'vs eager':>9} {'vs best':>8}")
    for r in rows:
        print(
            f"{r['case']:<40} {r['impl']:<10} {r['mode']:<8} {r['median_ms']:>10.2f} {r['speedup_vs_eager']:>8.2f}x"
            f" {r['vs_best']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
