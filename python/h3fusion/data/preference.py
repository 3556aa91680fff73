"""Multi-source preference data for FuseSFT / FusePO: records, JSONL IO, SFT weighting, pair building.

A record is one prompt with responses sampled from several source models, each scored by the user's reward model:

    {"prompt": str, "responses": [{"text": str, "source": str, "reward": float}, ...]}

Derived items (plain dicts, so any `torch.utils.data.Dataset` or `datasets.Dataset` can hold them):

    SFT item   {prompt, response, weight, source, reward}                      (`sft_examples`)
    pair item  {prompt, chosen, rejected, weight, source, chosen_reward,
                rejected_reward[, target_chosen, target_chosen_reward]}        (`build_pairs`)
    group item {prompt, responses: [str], rewards: [float], weights: [float]}  (`rloo_groups`)

Weights are normalised over the dataset: the per-prompt weights (softmax(r / tau) over a prompt's responses or
pairs) are scaled by one factor so that their mean over all items of the returned list is 1 — unit weights stay 1.
The losses (`h3fusion.losses.preference`) take the plain batch mean of w * l, so a weight means the same at every
batch size. Weights are computed in float64 log space; a response or pair whose weight is still 0 in float32 (tiny
temperatures) is dropped, with a warning giving the count, instead of reaching the loss as a dead example.
Subsetting a list (a train / eval split) changes its mean: pass the subset through `normalize_weights`.
(Pair rows and reference fields: `h3fusion.data.pair_layout`; reference log-probs:
`h3fusion.trainers.reference_logps`.)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.files import atomic_write_text

__all__ = [
    "PreferenceRecord",
    "Response",
    "build_pairs",
    "load_records",
    "normalize_weights",
    "rloo_groups",
    "save_records",
    "sft_examples",
]

# A float64 weight at or below this rounds to 0 in float32 (half the smallest float32 subnormal, 2**-149).
_FP32_ZERO = 2.0**-150


@dataclass(frozen=True)
class Response:
    """One sampled response: its text, the source model's name, and its scalar reward."""

    text: str
    source: str
    reward: float


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt and its multi-source responses."""

    prompt: str
    responses: tuple[Response, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: Any, where: str = "record") -> PreferenceRecord:
        """Validate and build from {"prompt", "responses": [{"text", "source", "reward"}]}; errors name `where`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        if not isinstance(d.get("prompt"), str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        rs = d.get("responses")
        if not isinstance(rs, list):
            raise ValueError(f"{where}: 'responses' must be a list")
        out = []
        for j, r in enumerate(rs):
            w = f"{where}.responses[{j}]"
            if not isinstance(r, dict):
                raise ValueError(f"{w}: expected an object")
            if not isinstance(r.get("text"), str):
                raise ValueError(f"{w}: 'text' must be a string")
            if not isinstance(r.get("source"), str):
                raise ValueError(f"{w}: 'source' must be a string")
            reward = r.get("reward")
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise ValueError(f"{w}: 'reward' must be a finite number, got {reward!r}")
            out.append(Response(r["text"], r["source"], float(reward)))
        return cls(d["prompt"], tuple(out))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "responses": [{"text": r.text, "source": r.source, "reward": r.reward} for r in self.responses],
        }


def _records(records: Iterable[PreferenceRecord | dict]) -> list[PreferenceRecord]:
    return [
        r if isinstance(r, PreferenceRecord) else PreferenceRecord.from_dict(r, f"records[{i}]")
        for i, r in enumerate(records)
    ]


def load_records(path: str | os.PathLike, *, allow_empty: bool = False) -> list[PreferenceRecord]:
    """Read records from a JSONL file (one record per non-empty line); errors name the file and line.

    Args:
        path: the JSONL file (UTF-8).
        allow_empty: return [] for a file without records instead of raising.

    Raises:
        ValueError: not UTF-8, invalid JSON or a bad record (file:line and field named), or no records.
    """
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                out.append(PreferenceRecord.from_dict(d, f"{path}:{lineno}"))
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} cannot be decoded); "
            "save the data as UTF-8 JSONL"
        ) from None
    if not out and not allow_empty:
        raise ValueError(f"{path}: no records (the file is empty); expected one JSON record per line")
    return out


def save_records(records: Iterable[PreferenceRecord | dict], path: str | os.PathLike) -> None:
    """Write records as JSONL, atomically (`h3fusion.utils.files.atomic_write_text`)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in _records(records)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _log_softmax(values: Sequence[float], temperature: float) -> list[float]:
    """log softmax(v / tau) in float64 log space: never an exp of a large number, and no division that overflows
    (the gaps to the maximum are divided, so they are <= 0; -inf where a weight is exactly 0)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    top = max(values)
    z = [(v - top) / temperature for v in values]  # <= 0, one of them 0
    lse = math.log(math.fsum(math.exp(v) for v in z))  # in [0, log K]
    return [v - lse for v in z]


def _weight_or_zero(log_w: float) -> float:
    """exp(log_w), or exactly 0.0 when it would be 0 in float32 (the dtype the loss sees it in)."""
    w = math.exp(log_w)
    return 0.0 if w <= _FP32_ZERO else w


def normalize_weights(items: Sequence[dict]) -> list[dict]:
    """Scale the items' weights by one factor so that their mean over all items is 1 (the dataset normalisation).

    SFT and pair items carry "weight" (1 when absent); group items carry "weights" (one per response; every response
    counts as an item). Unit weights stay 1. Returns new dicts; an empty list stays empty.

    Raises:
        ValueError: a weight is negative or not finite, or all weights are 0.
    """
    flat: list[float] = []
    for i, it in enumerate(items):
        ws = it["weights"] if "weights" in it else [it.get("weight", 1.0)]
        for w in ws:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
                raise ValueError(f"items[{i}]: weights must be finite numbers >= 0, got {w!r}")
            flat.append(float(w))
    if not items:
        return []
    total = math.fsum(flat)
    if total <= 0:
        raise ValueError("all weights are 0: nothing to train on")
    scale = len(flat) / total
    out = []
    for it in items:
        it = dict(it)
        if "weights" in it:
            it["weights"] = [float(w) * scale for w in it["weights"]]
        else:
            it["weight"] = float(it.get("weight", 1.0)) * scale
        out.append(it)
    return out


def _warn_dropped(where: str, what: str, dropped: int, total: int, temperature: float) -> None:
    if dropped:
        warnings.warn(
            f"{where}: dropped {dropped} of {total} {what} whose weight softmax(r / tau) is 0 in float32 at "
            f"temperature {temperature:g} (they would add nothing to the loss; a larger temperature keeps them)",
            stacklevel=3,
        )


def sft_examples(
    records: Iterable[PreferenceRecord | dict], *, top_k: int | None = None, temperature: float = 1.0
) -> list[dict[str, Any]]:
    """FuseSFT items: per prompt keep the top-k responses by reward, weighted by softmax(r_j / tau) over them.

        w_j = c * softmax_j(r_j / tau)   over the kept responses of the prompt,
        c   = N / (number of prompts)    (per-prompt weights sum to 1: this makes mean_j w_j = 1 over all N items)

    so every prompt carries the same total weight, and `weighted_sft_loss` (plain batch mean of w * l) is an
    unbiased minibatch estimate of (1/N) sum_j w_j l_j. Responses whose softmax weight is 0 in float32 (tiny tau)
    are dropped first (a warning gives the count); the normalisation is over the items returned.

    Args:
        records: records or their dicts.
        top_k: responses kept per prompt (None: all).
        temperature: tau > 0; small tau puts the weight on the best response, large tau spreads it evenly.

    Returns:
        list of {prompt, response, weight, source, reward}.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    _log_softmax([0.0], temperature)  # validates tau even when there are no records
    out, considered = [], 0
    for rec in _records(records):
        kept = sorted(rec.responses, key=lambda r: r.reward, reverse=True)[:top_k]
        if not kept:
            continue
        considered += len(kept)
        for r, log_w in zip(kept, _log_softmax([r.reward for r in kept], temperature), strict=True):
            w = _weight_or_zero(log_w)
            if w > 0:  # the best response's weight is >= 1/k: every prompt keeps at least one
                item = {"prompt": rec.prompt, "response": r.text, "weight": w, "source": r.source, "reward": r.reward}
                out.append(item)
    _warn_dropped("sft_examples", "responses", considered - len(out), considered, temperature)
    return normalize_weights(out)


def _pair(prompt, chosen: Response, rejected: Response, weight: float, source: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "weight": weight,
        "source": source,
        "chosen_reward": chosen.reward,
        "rejected_reward": rejected.reward,
    }


def build_pairs(
    records: Iterable[PreferenceRecord | dict],
    *,
    mode: str = "per_source",
    gap_min: float = 0.0,
    gap_max: float = math.inf,
    temperature: float = 1.0,
    target_source: str | None = None,
) -> list[dict[str, Any]]:
    """FusePO preference pairs with pair weights.

    A pair is kept only when its reward gap r(chosen) - r(rejected) is > 0 and within [gap_min, gap_max].

    mode="per_source" (FuseChat-3.0): for each source, its best vs its worst response. Pair weights:
        w_s = c * softmax over the prompt's kept sources of (best reward of s) / tau,
        c   = P / (number of prompts with pairs), so that the mean weight over all P pairs is 1
        (pairs whose softmax weight is 0 in float32 are dropped first, with a warning giving the count).
    mode="global": the prompt's best vs its worst response over all sources; weight 1.
    mode="wrpo": one triplet per prompt for `wrpo_loss`, weight 1, where `target_source` names the target model:
        target_chosen (y_wt) = the target's best response;
        chosen (y_ws)        = the best response of the other (source) models;
        rejected (y_l)       = the target's worst response when it has two or more, else the worst response of any
                               model other than y_ws and y_wt;
        kept when r(y_wt) - r(y_l) is in the gap window and r(y_ws) > r(y_l).
    In the other modes, a given `target_source` adds target_chosen = the target's best response to every pair, so
    the same pairs also serve `wrpo_loss` (the gap window then applies to the pair itself).

    Args:
        records: records or their dicts.
        mode: "per_source", "global" or "wrpo".
        gap_min, gap_max: the reward-gap window.
        temperature: tau > 0 of the per-source pair weights.
        target_source: the target model's source name (required for mode="wrpo").

    Returns:
        list of pair dicts (see the module docstring); weights with mean 1 over the list.

    Raises:
        ValueError: bad arguments, or a `target_source` that no response of the data comes from (the message lists
            the sources present).
    """
    if mode not in ("per_source", "global", "wrpo"):
        raise ValueError(f"mode must be 'per_source', 'global' or 'wrpo', got {mode!r}")
    if gap_min > gap_max:
        raise ValueError(f"gap_min ({gap_min}) must be <= gap_max ({gap_max})")
    if mode == "wrpo" and target_source is None:
        raise ValueError("mode='wrpo' needs target_source (the name of the target model's source)")
    _log_softmax([0.0], temperature)  # validates tau
    records = _records(records)
    if target_source is not None and records:
        present = sorted({r.source for rec in records for r in rec.responses})
        if target_source not in present:
            raise ValueError(
                f"target_source {target_source!r} has no responses in the data; sources present: {present}"
            )

    def in_window(hi: Response, lo: Response) -> bool:
        gap = hi.reward - lo.reward
        return gap > 0 and gap_min <= gap <= gap_max

    out: list[dict[str, Any]] = []
    considered = 0
    for rec in records:
        target = [r for r in rec.responses if r.source == target_source] if target_source is not None else []
        target_best = max(target, key=lambda r: r.reward) if target else None
        if mode == "wrpo":
            others = [r for r in rec.responses if r.source != target_source]
            if not target or not others:
                continue
            y_ws = max(others, key=lambda r: r.reward)
            if len(target) >= 2:
                y_l = min(target, key=lambda r: r.reward)
            else:
                rest = [r for r in others if r is not y_ws]
                if not rest:
                    continue
                y_l = min(rest, key=lambda r: r.reward)
            if not in_window(target_best, y_l) or y_ws.reward <= y_l.reward:
                continue
            p = _pair(rec.prompt, y_ws, y_l, 1.0, y_ws.source)
            p["target_chosen"], p["target_chosen_reward"] = target_best.text, target_best.reward
            out.append(p)
            continue
        if mode == "global":
            if len(rec.responses) < 2:
                continue
            best = max(rec.responses, key=lambda r: r.reward)
            worst = min(rec.responses, key=lambda r: r.reward)
            pairs = [(best, worst, best.source)] if in_window(best, worst) else []
            weights = [1.0] * len(pairs)
        else:
            by_source: dict[str, list[Response]] = {}
            for r in rec.responses:
                by_source.setdefault(r.source, []).append(r)
            pairs = []
            for source, rs in by_source.items():
                best, worst = max(rs, key=lambda r: r.reward), min(rs, key=lambda r: r.reward)
                if len(rs) >= 2 and in_window(best, worst):
                    pairs.append((best, worst, source))
            log_w = _log_softmax([b.reward for b, _, _ in pairs], temperature) if pairs else []
            weights = [_weight_or_zero(v) for v in log_w]
        considered += len(pairs)
        for (best, worst, source), w in zip(pairs, weights, strict=True):
            if w == 0:
                continue
            p = _pair(rec.prompt, best, worst, w, source)
            if target_best is not None:
                p["target_chosen"], p["target_chosen_reward"] = target_best.text, target_best.reward
            out.append(p)
    if mode == "per_source":
        _warn_dropped("build_pairs", "pairs", considered - len(out), considered, temperature)
    return normalize_weights(out)


def rloo_groups(records: Iterable[PreferenceRecord | dict], *, temperature: float | None = None) -> list[dict]:
    """RLOO items: one group per prompt with two or more responses (a single response has no leave-one-out baseline).

    Weights: 1 when `temperature` is None; else w_j = K * softmax(r_j / tau) over the K responses of the group
    (mean 1 per group), then normalised to mean 1 over all responses of the list. A response whose weight is 0 (tiny
    tau) stays in its group: its reward is part of the others' leave-one-out baseline; it adds 0 to the loss.

    Args:
        records: records or their dicts.
        temperature: None for unit weights, or tau > 0.

    Returns:
        list of {prompt, responses: [str], rewards: [float], weights: [float], sources: [str]}.
    """
    if temperature is not None:
        _log_softmax([0.0], temperature)  # validates tau
    out = []
    for rec in _records(records):
        if len(rec.responses) < 2:
            continue
        rewards = [r.reward for r in rec.responses]
        k = len(rewards)
        if temperature is None:
            weights = [1.0] * k
        else:
            weights = [_weight_or_zero(math.log(k) + v) for v in _log_softmax(rewards, temperature)]
        out.append(
            {
                "prompt": rec.prompt,
                "responses": [r.text for r in rec.responses],
                "rewards": rewards,
                "weights": weights,
                "sources": [r.source for r in rec.responses],
            }
        )
    return normalize_weights(out)
