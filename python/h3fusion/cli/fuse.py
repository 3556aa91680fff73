"""`h3fusion fuse`: build the H3Fusion MoE from a base and N aligned checkpoints / LoRA adapters and save it."""

from __future__ import annotations

import argparse
import os
import sys

from .common import CATEGORY_RE, add_overwrite_argument, max_shard_size, positive_int

HELP = "fuse N aligned models (checkpoints or LoRA adapters) into one Mixtral MoE checkpoint"


def _expert(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")  # the name never holds "=", so the path may
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    if not CATEGORY_RE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expert name {name!r}: use letters, digits, '_' and '-' only")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
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
    parser.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default 2)")
    parser.add_argument("--attention", choices=("base", "mean"), default="base", help="shared weights' source")
    parser.add_argument("--router-init", choices=("random", "zeros", "prototypes"), default="random")
    parser.add_argument(
        "--prototype-prompts",
        metavar="JSON",
        help='for --router-init prototypes: a JSON file {"NAME": ["prompt", ...], ...}',
    )
    parser.add_argument(
        "--allow-non-mlp-adapter",
        action="store_true",
        help="fuse LoRA adapters whose non-MLP changes (attention, embeddings...) are dropped, with a warning listing "
        "them (default: refuse such adapters)",
    )
    parser.add_argument(
        "--experts",
        choices=("materialised", "shared"),
        default="materialised",
        help="materialised: every expert a full FFN, a plain Mixtral checkpoint (default); shared: every layer keeps "
        "the base FFN once plus each expert's LoRA adapter (all experts must be adapters of --base, or see "
        "--delta-rank); load it with h3fusion.load_fused_model, `h3fusion export` makes it a plain Mixtral",
    )
    parser.add_argument(
        "--delta-rank",
        type=positive_int,
        default=None,
        help="with --experts shared: full-weight experts enter as the rank-R truncated SVD of their delta from the "
        "base (per projection); the relative reconstruction error per layer is printed and recorded",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument(
        "--max-shard-size", type=max_shard_size, default="5GB", help="safetensors shard size, e.g. 2GB (default 5GB)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for --router-init random")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or a previous `h3fusion fuse` output with --overwrite (replaced atomically)",
    )
    add_overwrite_argument(parser)


def load_prototype_prompts(path: str, names: list[str]) -> dict:
    """The --prototype-prompts file, checked: {expert name: [prompt string, ...]} for every expert."""
    from h3fusion.models.fuse import check_prototype_prompts
    from h3fusion.utils.files import read_json

    prompts = read_json(path, "--prototype-prompts")
    check_prototype_prompts(prompts, names, where=f"--prototype-prompts {path}")
    return prompts


def run(args: argparse.Namespace) -> int:
    """Check the options, inputs and --out; fuse straight into a staging folder
    (fuse_to_disk: streamed, holding --out's lock) that is swapped into --out atomically."""
    import warnings

    from h3fusion.utils.files import check_output_dir, claim_output_dir

    names = [n for n, _ in args.expert]
    if len(set(names)) != len(names):
        print(f"error: duplicate expert names in {names}", file=sys.stderr)
        return 2
    if args.top_k > len(names):
        raise ValueError(f"--top-k {args.top_k} is larger than the number of experts ({len(names)})")
    if args.prototype_prompts and args.router_init != "prototypes":
        raise ValueError("--prototype-prompts is only used with --router-init prototypes")
    if args.router_init == "prototypes" and not args.prototype_prompts:
        raise ValueError("--router-init prototypes needs --prototype-prompts FILE")
    if args.delta_rank is not None and args.experts != "shared":
        raise ValueError("--delta-rank applies to --experts shared only")
    inputs = [args.base, *(p for _, p in args.expert), args.prototype_prompts]
    # everything the user gave is checked before the (long) fusion starts
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    prompts = load_prototype_prompts(args.prototype_prompts, names) if args.prototype_prompts else None

    import torch

    from h3fusion.models.fuse import fuse_models, save_fused_model
    from h3fusion.models.fuse_stream import fuse_to_disk

    if args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    # the previous output (if any) stays in place until the new one is complete: cleared by the atomic swap only
    with claim_output_dir(args.out, kind="fuse", overwrite=args.overwrite, inputs=inputs, clear=False) as out:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            if args.experts == "shared":  # built in memory (FFNs: the base once + adapters), then saved
                model = fuse_models(
                    args.base,
                    dict(args.expert),
                    top_k=args.top_k,
                    attention=args.attention,
                    router_init=args.router_init,
                    prototype_prompts=prompts,
                    dtype=dtype,
                    progress=not args.no_progress,
                    allow_non_mlp_adapter=args.allow_non_mlp_adapter,
                    experts="shared",
                    delta_rank=args.delta_rank,
                )
                out = save_fused_model(model, out, base=args.base, overwrite=True)
            else:
                # streamed: tensor by tensor from the inputs into the output shards, never the whole fused model
                out = fuse_to_disk(
                    args.base,
                    dict(args.expert),
                    out,
                    top_k=args.top_k,
                    attention=args.attention,
                    router_init=args.router_init,
                    prototype_prompts=prompts,
                    dtype=dtype,
                    max_shard_size=args.max_shard_size,
                    overwrite=True,
                    progress=not args.no_progress,
                    allow_non_mlp_adapter=args.allow_non_mlp_adapter,
                )
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    from h3fusion.utils.files import read_json

    cfg = read_json(os.path.join(out, "config.json"))
    shared = (cfg.get("h3fusion") or {}).get("shared_experts") or {}
    for layer, experts in sorted((shared.get("delta_relative_error") or {}).items(), key=lambda kv: int(kv[0])):
        worst = ", ".join(f"{n} {max(e.values()):.3g}" for n, e in experts.items())
        print(f"layer {layer}: relative delta reconstruction error at rank {args.delta_rank}: {worst}")
    layout = f"shared base + rank-{shared['rank']} adapters" if shared else "materialised"
    print(
        f"fused {len(names)} experts ({', '.join(names)}) x {cfg['num_hidden_layers']} layers, "
        f"top-{cfg['num_experts_per_tok']}, attention={args.attention}, router={args.router_init}, "
        f"experts {layout}, {cfg.get('dtype')} -> {out}"
    )
    return 0
