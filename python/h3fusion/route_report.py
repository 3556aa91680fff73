"""Routing report of a fused MoE on labelled prompts: routing accuracy per category and per-layer expert usage.

An example is routed correctly when the argmax of its mean router probability p̄_b (mean over MoE layers and its
non-padding tokens, as in the gating loss) is its category's expert. Usage of expert e in layer l for category c is
the fraction of category c's real tokens whose top-k experts in layer l include e (each row sums to k).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data.instructions import (
    InstructionCollator,
    InstructionDataset,
    InstructionExample,
    expert_names_from_config,
)
from .losses.gating import mean_router_probs
from .models.hf_experts import current_experts_implementation
from .utils.files import atomic_write_bytes, atomic_write_json

__all__ = ["RoutingStats", "collect_routing_stats", "plot_usage_heatmaps", "route_report", "write_report_json"]


class RoutingStats(dict):
    """{"expert_names", "experts_implementation", "categories", "accuracy": {cat: float}, "overall_accuracy",
    "counts": {cat: int}, "usage": {cat: [[float] * E] * L}, "mean_prob": {cat: [[float] * E] * L},
    "confusion": [[int] * E] * E}; "experts_implementation" is what ran the MoE blocks ("h3fusion", "eager", ...)."""


@torch.no_grad()
def collect_routing_stats(
    model: torch.nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    expert_names: Sequence[str],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> RoutingStats:
    """Runs the model on tokenised examples (features with input_ids and category_labels) and gathers routing.

    Args:
        model: a MoE causal LM returning router logits with `output_router_logits=True`.
        dataset: features as from `InstructionDataset`.
        expert_names: category name of each expert index.
        pad_token_id: padding id for batching.
        batch_size: examples per forward.
        progress: show a progress bar.

    Returns:
        RoutingStats (plain JSON-serialisable values; overall_accuracy is NaN when `dataset` is empty).

    Raises:
        ValueError: batch_size < 1.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_experts = len(expert_names)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = InstructionCollator(pad_token_id)
    top_k = int(getattr(model.config, "num_experts_per_tok", 2))
    usage = None
    probs_sum = None
    counts_tok = torch.zeros(num_experts, dtype=torch.float64)
    confusion = torch.zeros(num_experts, num_experts, dtype=torch.long)
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="routing report", unit="batch")
    for start in starts:
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        mask = batch["attention_mask"].to(device)
        labels = batch["category_labels"]
        out = model(
            input_ids=batch["input_ids"].to(device), attention_mask=mask, output_router_logits=True, use_cache=False
        )
        logits = out.router_logits
        pred = mean_router_probs(logits, mask).argmax(-1).cpu()
        for y, p in zip(labels.tolist(), pred.tolist(), strict=True):
            confusion[y, p] += 1
        b, s = mask.shape
        if usage is None:
            usage = torch.zeros(num_experts, len(logits), num_experts, dtype=torch.float64)
            probs_sum = torch.zeros_like(usage)
        tok_cat = labels[:, None].expand(b, s).reshape(-1)
        real = mask.reshape(-1).bool().cpu()
        tok_cat = tok_cat[real]
        counts_tok += torch.bincount(tok_cat, minlength=num_experts).double()
        for layer, z in enumerate(logits):
            pz = torch.softmax(z.float(), -1).cpu()[real].double()
            chosen = torch.zeros_like(pz).scatter_(-1, pz.topk(top_k, -1).indices, 1.0)
            usage[:, layer].index_add_(0, tok_cat, chosen)
            probs_sum[:, layer].index_add_(0, tok_cat, pz)
    if was_training:
        model.train()
    stats = RoutingStats(
        expert_names=list(expert_names), top_k=top_k, experts_implementation=current_experts_implementation(model)
    )
    present = [c for c in range(num_experts) if confusion[c].sum() > 0]
    stats["categories"] = [expert_names[c] for c in present]
    stats["counts"] = {expert_names[c]: int(confusion[c].sum()) for c in present}
    stats["accuracy"] = {expert_names[c]: int(confusion[c, c]) / int(confusion[c].sum()) for c in present}
    total = int(confusion.sum())
    stats["overall_accuracy"] = int(confusion.diagonal().sum()) / total if total else float("nan")
    stats["confusion"] = confusion.tolist()
    denom = counts_tok.clamp_min(1)[:, None, None]
    stats["usage"] = {expert_names[c]: (usage / denom)[c].tolist() for c in present} if usage is not None else {}
    stats["mean_prob"] = (
        {expert_names[c]: (probs_sum / denom)[c].tolist() for c in present} if usage is not None else {}
    )
    return stats


def write_report_json(stats: Mapping[str, Any], path: str) -> None:
    """Writes the stats as indented standard JSON (atomically; NaN, e.g. the accuracy of no examples, is null)."""
    atomic_write_json(path, dict(stats))


def plot_usage_heatmaps(stats: Mapping[str, Any], path: str, title: str = "Expert usage per layer") -> None:
    """One heatmap (layers × experts) per category, side by side, saved as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(stats["usage"])
    names = stats["expert_names"]
    fig, axes = plt.subplots(1, max(len(cats), 1), figsize=(3.2 * max(len(cats), 1) + 1, 3.5), squeeze=False)
    image = None
    for ax, cat in zip(axes[0], cats, strict=False):
        data = torch.tensor(stats["usage"][cat])
        image = ax.imshow(data.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        acc = stats["accuracy"].get(cat)
        ax.set_title(f"{cat} (acc {acc:.0%})" if acc is not None else cat)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("layer")
        ax.set_yticks(range(data.shape[0]))
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = float(data[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="fraction of tokens routed to the expert")
    fig.suptitle(f"{title} (top-{stats.get('top_k', '?')})", y=1.03)

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def route_report(
    model: torch.nn.Module,
    examples: Sequence[InstructionExample],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    expert_names: Sequence[str] | None = None,
    max_length: int = 300,
    batch_size: int = 16,
    template: str | None = None,
    prefix: str = "route_report",
    progress: bool = False,
) -> RoutingStats:
    """Routing accuracy per category and usage heatmaps for labelled prompts; writes `<prefix>.json` and
    `<prefix>.png` under `out_dir`.

    Args:
        model: the fused MoE.
        examples: labelled instruction examples (their categories must be expert names).
        tokenizer: the model's tokenizer (needs a pad or EOS token).
        out_dir: output folder (created).
        expert_names: default: from the model config.
        max_length, template: tokenisation (see `tokenize_instruction`).
        batch_size: examples per forward.
        prefix: file name stem.
        progress: progress bar.

    Returns:
        the RoutingStats written to JSON.
    """
    names = list(expert_names) if expert_names is not None else expert_names_from_config(model.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = InstructionDataset(examples, tokenizer, names, max_length=max_length, template=template)
    stats = collect_routing_stats(model, ds, names, pad_token_id=pad, batch_size=batch_size, progress=progress)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_report_json(stats, os.path.join(out_dir, f"{prefix}.json"))
    plot_usage_heatmaps(stats, os.path.join(out_dir, f"{prefix}.png"))
    return stats
