"""The paper's Table 1: a row per model, a column per metric, and the fused model's gain over the best single
expert; as markdown (report.md), JSON (report.json) and a grouped bar chart (report.png, matplotlib Agg).

Gain = fused − best expert for metrics where higher is better, best expert − fused for the flagged ratio (lower
is better), so a positive gain always means the fused model is better.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["METRICS", "compare_results", "guess_roles", "table", "write_report"]

# (key, column title, higher is better)
METRICS = (
    ("truthfulqa_mc1", "TQA MC1", True),
    ("truthfulqa_mc2", "TQA MC2", True),
    ("truthful", "truthful", True),
    ("informative", "informative", True),
    ("truthful_informative", "true*info", True),
    ("flagged_ratio", "flagged", False),
    ("win_rate", "win rate", True),
    ("judge_win_rate", "judge win", True),
)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _expert_names(config) -> list[str]:
    """The H3Fusion expert names a fused model's config records ([] for any other model)."""
    if config is None:
        return []
    from ..data.instructions import expert_names_from_config

    try:
        return expert_names_from_config(config)
    except ValueError:
        return []


def guess_roles(
    results: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, Any] | None = None,
    fused: str | None = None,
    experts: Sequence[str] | None = None,
) -> tuple[str | None, list[str]]:
    """(fused model, single experts) for the gain column.

    Defaults: the fused model is the first whose config names H3Fusion experts (as `fuse_models` records them), else one
    named like "fused"; the experts are the other models whose names contain one of those expert names (e.g.
    "aligned-helpful"), else every other model except ones named like base or soup.

    Raises:
        ValueError: `fused` or an expert is not one of the models.
    """
    names = list(results)
    for n in [fused, *(experts or [])]:
        if n is not None and n not in results:
            raise ValueError(f"--fused/--experts: {n!r} is not one of the evaluated models {names}")
    expert_names: list[str] = []
    if fused is None:
        for n in names:
            expert_names = _expert_names((configs or {}).get(n))
            if expert_names:
                fused = n
                break
        else:
            fused = next((n for n in names if "fused" in n.lower()), None)
    elif configs:
        expert_names = _expert_names(configs.get(fused))
    if fused is None:
        return None, []
    if experts is None:
        others = [n for n in names if n != fused]
        experts = [n for n in others if any(e.lower() in n.lower() for e in expert_names)]
        if not experts:
            experts = [n for n in others if not any(w in n.lower() for w in ("base", "soup", "fused"))]
    return fused, list(experts)


def table(results: Mapping[str, Mapping[str, Any]], fused: str | None = None, experts: Sequence[str] = ()):
    """The Table-1 data: (columns [(key, title, higher_is_better)], rows {model: {key: value}}, gain {key: value})."""
    cols = [m for m in METRICS if any(_finite(r.get(m[0])) for r in results.values())]
    rows = {name: {k: r.get(k) for k, _, _ in cols} for name, r in results.items()}
    gain: dict[str, float | None] = {}
    if fused is not None and experts:
        for key, _, higher in cols:
            vals = [rows[e][key] for e in experts if _finite(rows[e][key])]
            f = rows[fused][key]
            if not vals or not _finite(f):
                gain[key] = None
                continue
            best = max(vals) if higher else min(vals)
            gain[key] = f - best if higher else best - f
    return cols, rows, gain


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if _finite(x) else "–"


def markdown(results, fused=None, experts=(), title: str = "H3Fusion evaluation") -> str:
    """The table as markdown (values in %, the flagged ratio with its 95% CI when known)."""
    cols, rows, gain = table(results, fused, experts)
    head = "| model | " + " | ".join(f"{t} {'↑' if hi else '↓'}" for _, t, hi in cols) + " |"
    lines = [f"# {title}", "", "Values in %.", "", head, "|---" * (len(cols) + 1) + "|"]
    for name, vals in rows.items():
        cells = []
        for key, _, _ in cols:
            cell = _pct(vals[key])
            ci = results[name].get(f"{key}_ci95")
            if ci and all(_finite(c) for c in ci):
                cell += f" [{_pct(ci[0])}, {_pct(ci[1])}]"
            cells.append(cell)
        mark = " (fused)" if name == fused else " (expert)" if name in experts else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    if gain:
        cells = [("–" if v is None else f"{100 * v:+.1f}") for v in (gain[k] for k, _, _ in cols)]
        lines.append("| **gain over best expert** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "↑ higher is better, ↓ lower is better; the gain is positive when the fused model is better.",
        "flagged: share of responses the moderation model flags, with its 95% Wilson interval.",
    ]
    heur = {n: r["refusal_rate_heuristic"] for n, r in results.items() if _finite(r.get("refusal_rate_heuristic"))}
    if heur:
        lines += [
            "",
            "Refusal-phrase rate (a heuristic, not the harmlessness score): "
            + ", ".join(f"{n} {_pct(v)}%" for n, v in heur.items()),
        ]
    return "\n".join(lines) + "\n"


def bar_chart(results, fused=None, experts=()) -> bytes:
    """A grouped bar chart (one group per metric, one bar per model) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows, _ = table(results, fused, experts)
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cols) * max(1, len(names)) / 3 + 3), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cols))]
        ys = [100 * v if _finite(v) else 0.0 for v in (rows[name][k] for k, _, _ in cols)]
        ax.bar(xs, ys, width, label=name + (" (fused)" if name == fused else ""))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{t} {'↑' if hi else '↓'}" for _, t, hi in cols])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("helpful / harmless / honest")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(results, out_dir: str | os.PathLike, *, fused=None, experts=None, configs=None) -> dict[str, Any]:
    """Write report.md, report.json and report.png into `out_dir`; returns the report.json content."""
    out = Path(out_dir)
    fused, experts = guess_roles(results, configs, fused, experts)
    cols, rows, gain = table(results, fused, experts)
    data = {
        "columns": [{"key": k, "title": t, "higher_is_better": hi} for k, t, hi in cols],
        "rows": rows,
        "fused": fused,
        "experts": experts,
        "gain_over_best_expert": gain,
    }
    atomic_write_json(out / "report.json", data)
    atomic_write_text(out / "report.md", markdown(results, fused, experts))
    if cols:
        atomic_write_bytes(out / "report.png", bar_chart(results, fused, experts))
    return data


def compare_results(
    dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, fused=None, experts=None, overwrite: bool = False
) -> dict[str, dict[str, Any]]:
    """Join the results.json of earlier evaluations into one report in `out_dir` (a model evaluated in several
    folders gets the folder name appended); returns the joined results."""
    from ..utils.files import OUTPUT_MARKER, OutputDirError, prepare_output_dir

    joined: dict[str, dict[str, Any]] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise ValueError(f"--compare: {d} has no results.json (not an h3fusion eval output)")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--compare: {path}: invalid JSON ({exc.msg})") from None
        for name, metrics in results.items():
            key = name if name not in joined else f"{name} ({Path(d).name})"
            joined[key] = metrics
    marker = Path(out_dir) / OUTPUT_MARKER
    if marker.is_file() and not overwrite and json.loads(marker.read_text()).get("kind") != "eval-compare":
        raise OutputDirError(f"--out: {out_dir} holds another h3fusion output; pass --overwrite or choose a new folder")
    out = prepare_output_dir(out_dir, kind="eval-compare", overwrite=overwrite, resume=True, inputs=dirs)
    atomic_write_json(out / "results.json", joined)
    write_report(joined, out, fused=fused, experts=experts)
    return joined
