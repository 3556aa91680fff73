"""`h3fusion fuse`: build the H3Fusion MoE from a base and N aligned checkpoints / LoRA adapters and save it."""

from __future__ import annotations

import argparse
import sys

HELP = "fuse N aligned models (checkpoints or LoRA adapters) into one Mixtral MoE checkpoint"


def _expert(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--expert expects NAME=PATH, got {spec!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model checkpoint directory (safetensors)")
    parser.add_argument(
        "--expert",
        action="append",
        type=_expert,
        required=True,
        metavar="NAME=PATH",
        help="an aligned model: a checkpoint directory or a LoRA adapter directory on the base; repeat per expert "
        "(the order is the expert order)",
    )
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--attention", choices=("base", "mean"), default="base", help="shared weights' source")
    parser.add_argument("--router-init", choices=("random", "zeros", "prototypes"), default="random")
    parser.add_argument(
        "--prototype-prompts",
        metavar="JSON",
        help='for --router-init prototypes: a JSON file {"NAME": ["prompt", ...], ...}',
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--seed", type=int, default=None, help="seed for --router-init random")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from h3fusion.models.fuse import fuse_models, save_fused_model

    names = [n for n, _ in args.expert]
    if len(set(names)) != len(names):
        print(f"error: duplicate expert names in {names}", file=sys.stderr)
        return 2
    prompts = None
    if args.prototype_prompts:
        with open(args.prototype_prompts) as f:
            prompts = json.load(f)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = fuse_models(
            args.base,
            dict(args.expert),
            top_k=args.top_k,
            attention=args.attention,
            router_init=args.router_init,
            prototype_prompts=prompts,
            dtype=dtype,
            progress=not args.no_progress,
        )
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = save_fused_model(model, args.out, base=args.base, max_shard_size=args.max_shard_size)
    cfg = model.config
    print(
        f"fused {len(names)} experts ({', '.join(names)}) x {cfg.num_hidden_layers} layers, "
        f"top-{cfg.num_experts_per_tok}, attention={args.attention}, router={args.router_init}, {model.dtype} -> {out}"
    )
    return 0
