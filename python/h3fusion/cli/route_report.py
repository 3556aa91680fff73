"""`h3fusion route-report MODEL --data FILE... [--out DIR]`: routing accuracy per category and usage heatmaps."""

from __future__ import annotations

import argparse

from .common import (
    add_data_arguments,
    add_device_argument,
    add_experts_implementation_argument,
    add_overwrite_argument,
    load_data_arguments,
    load_pretrained,
    model_path,
    positive_int,
    prompt_template,
    resolve_device,
)

HELP = "routing accuracy per category and per-layer expert-usage heatmaps of a fused model (PNG + JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags (shared ones from `h3fusion.cli.common`)."""
    parser.add_argument("model", type=model_path, help="fused model directory (from `h3fusion fuse` / `train`)")
    add_data_arguments(parser)
    parser.add_argument(
        "--out",
        default="h3fusion-route-report",
        help="output folder: new, empty, or a previous route-report with --overwrite (default: %(default)s)",
    )
    add_overwrite_argument(parser)
    parser.add_argument("--tokenizer", type=model_path, default=None, help="tokenizer directory (default: the model)")
    parser.add_argument("--template", type=prompt_template, default=None, help="prompt template, as for `train`")
    parser.add_argument("--max-length", type=positive_int, default=300, help="tokens per example")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward")
    add_device_argument(parser)
    add_experts_implementation_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check --out and the data; run the model on it; write the JSON + PNG report into --out."""
    from h3fusion.utils.files import check_output_dir, claim_output_dir

    inputs = [args.model, args.tokenizer, *(p for _, p in args.data)]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    examples = load_data_arguments(args.data)
    if not examples:
        raise ValueError(f"--data: the files {[p for _, p in args.data]} hold no examples")
    device = resolve_device(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.models import set_experts_implementation
    from h3fusion.models.shared_format import is_shared_dir, load_fused_model
    from h3fusion.route_report import route_report

    if is_shared_dir(args.model):  # shared-base experts (design.md §11)
        model = load_fused_model(args.model, device=device)
    else:
        model = load_pretrained(AutoModelForCausalLM, args.model, "model").to(device)
    set_experts_implementation(model, args.experts_implementation)
    tokenizer = load_pretrained(AutoTokenizer, args.tokenizer or args.model, "--tokenizer")
    with claim_output_dir(args.out, kind="route-report", overwrite=args.overwrite, inputs=inputs) as out:
        stats = route_report(
            model,
            examples,
            tokenizer,
            out,
            max_length=args.max_length,
            batch_size=args.batch_size,
            template=args.template,
            progress=True,
        )
    print(f"{'category':<16}{'examples':>10}{'routing acc':>14}")
    for cat in stats["categories"]:
        print(f"{cat:<16}{stats['counts'][cat]:>10}{stats['accuracy'][cat]:>14.1%}")
    print(f"{'overall':<16}{sum(stats['counts'].values()):>10}{stats['overall_accuracy']:>14.1%}")
    print(f"wrote {out}/route_report.json and {out}/route_report.png")
    return 0
