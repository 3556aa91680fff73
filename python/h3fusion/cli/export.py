"""`h3fusion export SHARED_DIR --out DIR`: a shared-base fused model -> a plain Mixtral checkpoint.

Every expert is materialised as W_base + s·B_e·A_e (design.md §11), so the output loads with plain
`AutoModelForCausalLM.from_pretrained` (and serving engines) like any `h3fusion fuse` output.
"""

from __future__ import annotations

import argparse

from .common import add_overwrite_argument, max_shard_size, model_path

HELP = "write a shared-base fused model (h3fusion fuse --experts shared) as a plain Mixtral checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    parser.add_argument("model", type=model_path, help="shared-base model folder (fuse --experts shared, or trained)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or a previous h3fusion output with --overwrite (replaced atomically)",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument(
        "--max-shard-size", type=max_shard_size, default="5GB", help="safetensors shard size, e.g. 2GB (default 5GB)"
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check the input and --out; load, merge every expert's adapter into its own FFN, save atomically."""
    from h3fusion.models.shared_format import is_shared_dir
    from h3fusion.utils.files import check_output_dir, claim_output_dir

    if not is_shared_dir(args.model):
        raise ValueError(
            f"{args.model} is not a shared-base fused model (from `h3fusion fuse --experts shared`); "
            "a plain checkpoint needs no export"
        )
    inputs = [args.model]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)

    import contextlib

    import torch
    from transformers import AutoTokenizer

    from h3fusion.models.fuse import save_fused_model
    from h3fusion.models.shared_format import export_shared_model, load_fused_model

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    with claim_output_dir(args.out, kind="export", overwrite=args.overwrite, inputs=inputs, clear=False) as out:
        model = export_shared_model(load_fused_model(args.model, dtype=dtype))
        tokenizer = None
        with contextlib.suppress(Exception):  # a folder without a tokenizer exports without one
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        out = save_fused_model(model, out, tokenizer, max_shard_size=args.max_shard_size, overwrite=True)
    cfg = model.config
    print(
        f"exported {cfg.num_local_experts} experts x {cfg.num_hidden_layers} layers (materialised), "
        f"{model.dtype} -> {out}"
    )
    return 0
