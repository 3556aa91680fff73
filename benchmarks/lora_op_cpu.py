"""CPU timing of moe_ffn with per-expert LoRA (design.md §10) against the two obvious alternatives.

Rows (medians of interleaved calls, after a warm-up call each):
  * fwd+bwd, per-expert base frozen (x, routing weights and the four factors train, as in LoRA fine-tuning):
    ours (`moe_ffn(..., lora=ExpertLoRA)`), the reference path (`reference.moe_lora_ffn`: W + s B A materialised,
    then the per-expert loop), and "materialised + moe_ffn" (W + s B A formed under autograd, then our plain kernel).
  * forward (no autograd), shared base: ours against materialising the E expert weights and calling moe_ffn.

Run: `PYTHONPATH=$PWD:$PWD/python python benchmarks/lora_op_cpu.py --threads 2` (a program, not a pytest test).
"""

from __future__ import annotations

import argparse

import torch
from h3fusion.bench.common import time_interleaved

import h3fusion_ext
from h3fusion_ext import ExpertLoRA, reference


def make(T, H, F, E, k, r, shared, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Eb = 1 if shared else E
    weights, experts = reference.topk_route(torch.randn(T, E, generator=g), k)
    return dict(
        x=torch.randn(T, H, generator=g).to(dtype),
        weights=weights,
        experts=experts,
        gate_up=(torch.randn(Eb, 2 * F, H, generator=g) / H**0.5).to(dtype),
        down=(torch.randn(Eb, H, F, generator=g) / F**0.5).to(dtype),
        a1=(torch.randn(E, r, H, generator=g) / H**0.5).to(dtype),
        b1=(torch.randn(E, 2 * F, r, generator=g) / r**0.5).to(dtype),
        a2=(torch.randn(E, r, F, generator=g) / F**0.5).to(dtype),
        b2=(torch.randn(E, H, r, generator=g) / r**0.5).to(dtype),
        s=2.0,
    )


def ours(p):
    lora = ExpertLoRA(p["a1"], p["b1"], p["a2"], p["b2"], p["s"])
    return h3fusion_ext.moe_ffn(p["x"], p["weights"], p["experts"], p["gate_up"], p["down"], lora=lora)


def via_reference(p):
    return reference.moe_lora_ffn(
        p["x"], p["weights"], p["experts"], p["gate_up"], p["down"], p["a1"], p["b1"], p["a2"], p["b2"], p["s"]
    )


def materialised(p):
    E = p["a1"].shape[0]
    gate_up = p["gate_up"].expand(E, -1, -1) + p["s"] * torch.bmm(p["b1"], p["a1"])
    down = p["down"].expand(E, -1, -1) + p["s"] * torch.bmm(p["b2"], p["a2"])
    return h3fusion_ext.moe_ffn(p["x"], p["weights"], p["experts"], gate_up, down)


def fwd_bwd(fn, p, trainable):
    leaves = {n: p[n].detach().requires_grad_(n in trainable) if n in trainable else p[n] for n in p}

    def step():
        for n in trainable:
            leaves[n].grad = None
        y = fn(leaves)
        y.backward(torch.ones_like(y))

    return step


def forward_only(fn, p):
    def step():
        with torch.no_grad():
            fn(p)

    return step


def report(title, results):
    print(title)
    base = results["ours"]["median_ms"]
    for name, r in results.items():
        if isinstance(r, Exception):
            print(f"  {name:28s} failed: {r}")
        else:
            print(
                f"  {name:28s} {r['median_ms']:9.1f} ms  (q20 {r['q20_ms']:.1f}, q80 {r['q80_ms']:.1f}, "
                f"n={r['repeats']})  {r['median_ms'] / base:5.2f}x ours"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="2048,1024,2816", help="T,H,F")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    T, H, F = (int(v) for v in args.shape.split(","))
    r = args.rank
    kw = dict(warmup=1, repeats=args.repeats, budget_s=600.0, device="cpu")

    p = make(T, H, F, 8, 2, r, shared=False)
    trainable = ("x", "weights", "a1", "b1", "a2", "b2")  # base frozen
    res = time_interleaved(
        {
            name: fwd_bwd(fn, p, trainable)
            for name, fn in (("ours", ours), ("reference", via_reference), ("materialised + moe_ffn", materialised))
        },
        **kw,
    )
    report(f"fwd+bwd, per-expert base frozen, fp32, T{T} H{H} F{F} E8 k2 r{r}, {args.threads} threads", res)

    p = make(T, H, F, 3, 2, r, shared=True)
    res = time_interleaved(
        {name: forward_only(fn, p) for name, fn in (("ours", ours), ("materialised + moe_ffn", materialised))}, **kw
    )
    report(f"forward, shared base, fp32, T{T} H{H} F{F} E3 k2 r{r}, {args.threads} threads", res)
    res = time_interleaved(
        {name: fwd_bwd(fn, p, trainable) for name, fn in (("ours", ours), ("materialised + moe_ffn", materialised))},
        **kw,
    )
    report(f"fwd+bwd, shared base frozen, fp32, T{T} H{H} F{F} E3 k2 r{r}, {args.threads} threads", res)


if __name__ == "__main__":
    main()
