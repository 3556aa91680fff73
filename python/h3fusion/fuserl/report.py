"""The FuseRL pipeline report: stage timings, data statistics, reward histograms and training curves.

Figures are PNGs drawn with matplotlib's Agg backend (no display needed); the report itself is `report.md` (for
people) and `report.json` (the same numbers, for programs), both written atomically.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["plot_reward_histogram", "plot_training_curves", "progress_printer", "write_report"]


def progress_printer(prefix: str, unit: str = "prompts"):
    """A progress callback (label, done, total) printing to stderr about every 10% of each label's items."""
    last: dict[str, int] = {}

    def report(label: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(label, 0) >= step:
            last[label] = done
            print(f"[{prefix}] {label}: {done}/{total} {unit}", file=sys.stderr, flush=True)

    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_reward_histogram(records: Sequence[dict], path: str | os.PathLike, title: str = "rewards") -> Path:
    """One overlaid reward histogram per source (shared bins) from scored records; returns the PNG path."""
    plt = _pyplot()
    by: dict[str, list[float]] = {}
    for rec in records:
        for r in rec["responses"]:
            by.setdefault(r["source"], []).append(float(r["reward"]))
    values = [v for vs in by.values() for v in vs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values:
        lo, hi = min(values), max(values)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        for source, vs in by.items():
            ax.hist(vs, bins=bins, alpha=0.5, label=f"{source} (n={len(vs)})")
        ax.legend(fontsize=8)
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(title)
    return _save(fig, path)


def plot_training_curves(logs: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Path | None:
    """Loss per step of each training stage (and FusePO's reward margin and accuracy when logged).

    Args:
        logs: stage name -> transformers `log_history` (list of dicts with "step" and metric keys).
        path: the PNG to write.

    Returns:
        the PNG path, or None when no stage logged a loss.
    """
    panels = [("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")]
    used = [(k, label) for k, label in panels if any(k in h for hist in logs.values() for h in hist)]
    if not used:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(used), figsize=(4.2 * len(used), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], used, strict=True):
        for stage, hist in logs.items():
            points = [(h["step"], h[key]) for h in hist if key in h and "step" in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=stage)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write `report.json` and `report.md` into `out_dir`.

    Args:
        report: {"stages": [{name, status, seconds, hash}], "data": {...}, "figures": {name: file},
                 "training": {stage: summary}, "eval": {...} | None}.

    Returns:
        (markdown path, json path).
    """
    out_dir = Path(out_dir)
    json_path = atomic_write_json(out_dir / "report.json", report)
    lines = ["# FuseRL pipeline report", ""]
    lines += ["## Stages", "", "| stage | status | seconds | seconds when it ran |", "|---|---|---|---|"]
    for s in report.get("stages", []):
        ran = s.get("ran_seconds")
        ran_text = f"{ran:.1f}" if isinstance(ran, (int, float)) else f"{s.get('seconds', 0.0):.1f}"
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0.0):.1f} | {ran_text} |")
    if "seconds" in report:
        lines += ["", f"Whole run: {report['seconds']:.1f} s. Final model: `{report.get('final_model')}`."]
    data = report.get("data", {})
    sample = data.get("sample")
    if sample:
        lines += [
            "",
            "## Samples",
            "",
            f"{sample['prompts']} prompts. Generation: "
            + ", ".join(f"{k}={v}" for k, v in (sample.get("generation") or {}).items() if k != "batch_size")
            + ".",
            "",
            "| source | responses | stopped | hit max tokens | mean new tokens | dropped empty |",
            "|---|---|---|---|---|---|",
        ]
        dropped = sample.get("dropped_empty", {})
        for src, d in sample["per_source"].items():
            lines.append(
                f"| {src} | {d['responses']} | {d.get('stop', 0)} | {d.get('length', 0)} | "
                f"{d['mean_new_tokens']:.1f} | {dropped.get(src, 0)} |"
            )
    score = data.get("score")
    if score:
        lines += ["", "## Rewards", "", "| source | count | mean | std | min | max |", "|---|---|---|---|---|---|"]
        for src, d in score["rewards"].items():
            lines.append(
                f"| {src} | {d['count']} | {d['mean']:.4g} | {d['std']:.4g} | {d['min']:.4g} | {d['max']:.4g} |"
            )
    build = data.get("build")
    if build:
        lines += ["", "## Training data", "", "| quantity | value |", "|---|---|"]
        for k, v in build.items():
            if not isinstance(v, dict):
                lines.append(f"| {k} | {_fmt(v)} |")
        for key, label in (("sft_items_per_source", "SFT items"), ("po_items_per_source", "preference items")):
            per = build.get(key) or {}
            if per:
                lines.append(f"| {label} per source | {', '.join(f'{k}: {v}' for k, v in per.items())} |")
        skipped = build.get("skipped_sft_records", 0) + build.get("skipped_po_records", 0)
        if skipped:
            lines += [
                "",
                f"{skipped} record(s) yield no training item; each is listed with its reason and reward "
                "gaps in `build/skipped_records.jsonl`.",
            ]
    training = report.get("training") or {}
    if training:
        lines += ["", "## Training", "", "| stage | items | steps | first loss | last loss |", "|---|---|---|---|---|"]
        for name, t in training.items():
            lines.append(
                f"| {name} | {t.get('items')} | {t.get('steps')} | {_fmt(t.get('first_loss'))} | "
                f"{_fmt(t.get('last_loss'))} |"
            )
    ev = report.get("eval")
    if ev:
        lines += ["", "## Evaluation (`h3fusion eval`)", ""]
        rows = {m: v for m, v in ev.items() if isinstance(v, dict)}
        if rows and len(rows) == len(ev):
            metrics = sorted({k for v in rows.values() for k in v})
            lines += ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(_fmt(v.get(k, "")) for k in metrics) + " |" for m, v in rows.items()]
        else:
            lines += ["```json", _json(ev), "```"]
    figures = report.get("figures") or {}
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({file})" for name, file in figures.items()]
    md_path = atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return md_path, json_path


def _json(obj: Any) -> str:
    import json

    from ..utils.files import to_json_safe

    return json.dumps(to_json_safe(obj), indent=1)
