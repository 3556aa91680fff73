"""`h3fusion route-report MODEL --data FILE... [--out DIR]`: routing accuracy per category and usage heatmaps."""

from __future__ import annotations

import argparse

from .common import add_experts_implementation_argument

HELP = "routing accuracy per category and per-layer expert-usage heatmaps of a fused model (PNG + JSON)"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--data [CATEGORY=]FILE` (repeatable): JSON/JSONL instruction records; CATEGORY fills missing categories."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="[CATEGORY=]FILE",
        help="JSON/JSONL records {instruction, input?, output, category}; repeat per file; CATEGORY= sets a default",
    )


def load_data_arguments(specs: list[str]):
    """Parses `--data` values into a list of InstructionExample."""
    from h3fusion.data import load_instructions

    examples = []
    for spec in specs:
        category, path = spec.split("=", 1) if "=" in spec and not spec.startswith(("/", ".")) else (None, spec)
        examples.extend(load_instructions(path, category=category))
    return examples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="fused model directory (from `h3fusion fuse` / `h3fusion train`)")
    add_data_arguments(parser)
    parser.add_argument("--out", default="h3fusion-route-report", help="output folder (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--max-length", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    add_experts_implementation_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.models import set_experts_implementation
    from h3fusion.route_report import route_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    set_experts_implementation(model, args.experts_implementation)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    examples = load_data_arguments(args.data)
    stats = route_report(
        model, examples, tokenizer, args.out, max_length=args.max_length, batch_size=args.batch_size, progress=True
    )
    print(f"{'category':<16}{'examples':>10}{'routing acc':>14}")
    for cat in stats["categories"]:
        print(f"{cat:<16}{stats['counts'][cat]:>10}{stats['accuracy'][cat]:>14.1%}")
    print(f"{'overall':<16}{sum(stats['counts'].values()):>10}{stats['overall_accuracy']:>14.1%}")
    print(f"wrote {args.out}/route_report.json and {args.out}/route_report.png")
    return 0
