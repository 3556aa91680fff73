"""Building FuseSFT / FusePO training data from scored records (`h3fusion build-data`).

Prompts are split (seeded) between the SFT stage and the preference stage (FuseChat-3.0: 4:6). The SFT items are
`h3fusion.data.preference.sft_examples` (top-k by reward, softmax(r / tau) weights); the preference items are
`build_pairs` (per-source gap-window pairs, global pairs, WRPO triplets) or `rloo_groups`. This module only splits,
counts and explains: every record that yields no item is listed with its per-source reward gaps, never silently
dropped.

Output folder:
    sft_records.jsonl, po_records.jsonl   the two splits, in the record format `fuse-sft` / `fuse-po` read
    sft_items.jsonl, po_items.jsonl       the weighted SFT items and the pairs / triplets / groups (for inspection;
                                          the trainers rebuild them from the records with the same settings)
    skipped_records.jsonl                 {split, id, prompt, reason, responses_per_source, reward_gaps}
    stats.json                            the settings and the counts
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.preference import PreferenceRecord, build_pairs, rloo_groups, save_records, sft_examples
from ..utils.files import atomic_write_json, atomic_write_text
from .records import read_jsonl_objects, write_jsonl_lines

__all__ = ["BuildSettings", "build_data", "load_scored_records", "split_records"]

MODES = ("per_source", "global", "wrpo", "rloo")


@dataclass
class BuildSettings:
    """Settings of `h3fusion build-data`.

    Attributes:
        sft_ratio: fraction of prompts for the SFT stage (the rest go to the preference stage).
        seed: seed of the split.
        top_k: SFT responses kept per prompt (None: all).
        sft_temperature: tau of the SFT weights softmax(r / tau).
        mode: "per_source", "global", "wrpo" (pair layouts of `build_pairs`) or "rloo" (`rloo_groups`).
        gap_min, gap_max: the reward-gap window of a kept pair.
        temperature: tau of the per-source pair weights.
        target_source: the target model's source name (needed by "wrpo").
        rloo_temperature: RLOO response weights K * softmax(r / tau) (None: unit weights).
    """

    sft_ratio: float = 0.4
    seed: int = 0
    top_k: int | None = None
    sft_temperature: float = 1.0
    mode: str = "per_source"
    gap_min: float = 0.0
    gap_max: float = math.inf
    temperature: float = 1.0
    target_source: str | None = None
    rloo_temperature: float | None = None

    def validate(self) -> None:
        if not 0.0 <= self.sft_ratio <= 1.0:
            raise ValueError(f"sft_ratio must be in [0, 1], got {self.sft_ratio}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "wrpo" and not self.target_source:
            raise ValueError("mode 'wrpo' needs target_source (the source name of the target model's responses)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.gap_min > self.gap_max:
            raise ValueError(f"gap_min ({self.gap_min}) must be <= gap_max ({self.gap_max})")
        for name in ("sft_temperature", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def pair_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `build_pairs` for the pair modes."""
        return {
            "mode": self.mode,
            "gap_min": self.gap_min,
            "gap_max": self.gap_max,
            "temperature": self.temperature,
            "target_source": self.target_source,
        }


def load_scored_records(path: str | os.PathLike) -> list[dict]:
    """Read scored records, each validated by `PreferenceRecord.from_dict` (errors name file:line and the field).

    Returns:
        the raw dicts (extra fields such as "id" kept); a record without "id" gets its 0-based position.
    """
    out = []
    for where, d in read_jsonl_objects(path, "scored records"):
        PreferenceRecord.from_dict(d, where)
        out.append({**d, "id": d.get("id", len(out))})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def split_records(records: list[dict], sft_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split: round(sft_ratio * n) random records for SFT, the rest for the preference stage.

    Each split keeps the input order.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    sft_ids = set(order[: round(sft_ratio * len(records))])
    sft = [r for i, r in enumerate(records) if i in sft_ids]
    po = [r for i, r in enumerate(records) if i not in sft_ids]
    return sft, po


def _po_items(records: list[dict], s: BuildSettings) -> list[dict]:
    if s.mode == "rloo":
        return rloo_groups(records, temperature=s.rloo_temperature)
    return build_pairs(records, **s.pair_kwargs())


def _explain(rec: dict, s: BuildSettings, split: str) -> dict[str, Any]:
    by: dict[str, list[float]] = {}
    for r in rec["responses"]:
        by.setdefault(r["source"], []).append(float(r["reward"]))
    gaps = {src: max(v) - min(v) for src, v in by.items()}
    n = sum(len(v) for v in by.values())
    window = f"[{s.gap_min:g}, {s.gap_max:g}]"
    if split == "sft":
        reason = "no responses"
    elif s.mode == "rloo":
        reason = f"{n} response(s); RLOO needs two or more"
    elif s.mode == "global":
        all_r = [x for v in by.values() for x in v]
        gap = max(all_r) - min(all_r) if all_r else 0.0
        reason = f"best-worst reward gap {gap:.4g} is not > 0 and within {window}" if n >= 2 else f"{n} response(s)"
    elif s.mode == "wrpo":
        if s.target_source not in by:
            reason = f"no response from the target source {s.target_source!r}"
        elif len(by) < 2:
            reason = "no response from any source other than the target"
        else:
            reason = f"no (target best, rejected) gap within {window} with the source best above the rejected"
    else:
        reason = f"no source has two responses whose best-worst reward gap is > 0 and within {window}"
    return {
        "split": split,
        "id": rec.get("id"),
        "prompt": rec["prompt"],
        "reason": reason,
        "responses_per_source": {k: len(v) for k, v in by.items()},
        "reward_gaps": gaps,
    }


def build_data(records: list[dict], out_dir: str | os.PathLike, settings: BuildSettings) -> dict[str, Any]:
    """Split scored records, build the SFT and preference items, write the output folder (module docstring).

    Args:
        records: scored record dicts (`load_scored_records`).
        out_dir: an existing folder we own (see `h3fusion.utils.files.prepare_output_dir`).
        settings: the build settings.

    Returns:
        the statistics written to stats.json: record / item counts per split, items per source, skipped records,
        mean reward gap of the pairs.
    """
    settings.validate()
    out = Path(out_dir)
    sft, po = split_records(records, settings.sft_ratio, settings.seed)
    sft_items = sft_examples(sft, top_k=settings.top_k, temperature=settings.sft_temperature) if sft else []
    po_items = _po_items(po, settings) if po else []
    skipped = []
    if sft:
        skipped += [_explain(r, settings, "sft") for r in sft if not r["responses"]]
    for rec in po:
        # counted one record at a time only to know which records yield nothing; the items come from the
        # whole-set call above (weights may be normalised over the whole data set)
        if not _po_items([rec], settings):
            skipped.append(_explain(rec, settings, "po"))
    save_records(sft, out / "sft_records.jsonl")
    save_records(po, out / "po_records.jsonl")
    atomic_write_text(out / "sft_items.jsonl", write_jsonl_lines(sft_items))
    atomic_write_text(out / "po_items.jsonl", write_jsonl_lines(po_items))
    atomic_write_text(out / "skipped_records.jsonl", write_jsonl_lines(skipped))
    gaps = [it["chosen_reward"] - it["rejected_reward"] for it in po_items if "chosen_reward" in it]
    stats = {
        "records": len(records),
        "sft_records": len(sft),
        "po_records": len(po),
        "sft_items": len(sft_items),
        "po_items": len(po_items),
        "po_mode": settings.mode,
        "skipped_sft_records": sum(s["split"] == "sft" for s in skipped),
        "skipped_po_records": sum(s["split"] == "po" for s in skipped),
        "mean_pair_reward_gap": sum(gaps) / len(gaps) if gaps else None,
        "sft_items_per_source": dict(Counter(it["source"] for it in sft_items)),
        "po_items_per_source": dict(Counter(it["source"] for it in po_items if "source" in it)),
        "settings": asdict(settings),
    }
    atomic_write_json(out / "stats.json", stats)
    return stats
