"""A small forward+backward of every op on the GPU, for compute-sanitizer (memcheck, racecheck).

Shapes are deliberately awkward (odd H and F, an expert with no tokens, T not a multiple of any tile) so that
tail handling is exercised.  Usage: python benchmarks/sanitizer_case.py [--small]
"""

from __future__ import annotations

import argparse

import torch

import h3fusion_ext


def run(T: int, H: int, F: int, E: int, k: int, N: int, V: int, dtype: torch.dtype) -> None:
    dev = "cuda"
    logits = torch.randn(T, E, device=dev, requires_grad=True)
    # keep the last expert empty: its logit is far below the others
    with torch.no_grad():
        logits[:, -1] -= 100.0
    weights, experts = h3fusion_ext.topk_route(logits, k)
    x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F, H, device=dev, dtype=dtype) / H**0.5).requires_grad_()
    down = (torch.randn(E, H, F, device=dev, dtype=dtype) / F**0.5).requires_grad_()
    y = h3fusion_ext.moe_ffn(x, weights, experts, gate_up, down)
    y.float().square().mean().backward()

    hidden = torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device=dev, dtype=dtype) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)
    targets[::5] = -100
    h3fusion_ext.linear_logprob(hidden, weight, targets).sum().backward()
    torch.cuda.synchronize()
    for name, t in [
        ("x", x),
        ("gate_up", gate_up),
        ("down", down),
        ("logits", logits),
        ("hidden", hidden),
        ("weight", weight),
    ]:
        assert t.grad is not None and torch.isfinite(t.grad.float()).all(), f"bad gradient for {name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="tiny shapes (racecheck is slow)")
    args = p.parse_args()
    assert h3fusion_ext.has_cuda_kernels(), "this build has no CUDA kernels"
    torch.manual_seed(0)
    if args.small:
        shapes = dict(T=37, H=72, F=40, E=5, k=2, N=29, V=300)
    else:
        shapes = dict(T=301, H=136, F=200, E=9, k=3, N=257, V=5003)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        run(dtype=dtype, **shapes)
        print(f"ok {dtype} {shapes}")


if __name__ == "__main__":
    main()
