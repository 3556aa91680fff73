"""Multi-source preference data for FuseSFT / FusePO: records, JSONL IO, SFT weighting, pair building, reference
log-prob precomputation and caching.

A record is one prompt with responses sampled from several source models, each scored by the user's reward model:

    {"prompt": str, "responses": [{"text": str, "source": str, "reward": float}, ...]}

Derived items (plain dicts, so any `torch.utils.data.Dataset` or `datasets.Dataset` can hold them):

    SFT item   {prompt, response, weight, source, reward}                      (`sft_examples`)
    pair item  {prompt, chosen, rejected, weight, source, chosen_reward,
                rejected_reward[, target_chosen, target_chosen_reward]}        (`build_pairs`)
    group item {prompt, responses: [str], rewards: [float], weights: [float]}  (`rloo_groups`)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PreferenceRecord",
    "Response",
    "build_pairs",
    "load_records",
    "model_fingerprint",
    "precompute_reference_logps",
    "rloo_groups",
    "save_records",
    "sft_examples",
]


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


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # a crash mid-write must never leave a truncated file under the final name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_records(path: str | os.PathLike) -> list[PreferenceRecord]:
    """Read records from a JSONL file (one record per non-empty line); errors give the line number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            out.append(PreferenceRecord.from_dict(d, f"{path}:{lineno}"))
    return out


def save_records(records: Iterable[PreferenceRecord | dict], path: str | os.PathLike) -> None:
    """Write records as JSONL (temp file, then rename)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in _records(records)]
    _atomic_write_text(path, "".join(line + "\n" for line in lines))


def _softmax(values: Sequence[float], temperature: float) -> list[float]:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(torch.tensor(values, dtype=torch.float64) / temperature, 0).tolist()


def sft_examples(
    records: Iterable[PreferenceRecord | dict], *, top_k: int | None = None, temperature: float = 1.0
) -> list[dict[str, Any]]:
    """FuseSFT items: per prompt keep the top-k responses by reward, weight w_j = softmax(r_j / tau) over them.

    The weights of one prompt sum to 1, so every prompt counts equally in `weighted_sft_loss`.

    Args:
        records: records or their dicts.
        top_k: responses kept per prompt (None: all).
        temperature: tau > 0; small tau puts the weight on the best response, large tau spreads it evenly.

    Returns:
        list of {prompt, response, weight, source, reward}.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    out = []
    for rec in _records(records):
        kept = sorted(rec.responses, key=lambda r: r.reward, reverse=True)[:top_k]
        if not kept:
            continue
        for r, w in zip(kept, _softmax([r.reward for r in kept], temperature), strict=True):
            out.append({"prompt": rec.prompt, "response": r.text, "weight": w, "source": r.source, "reward": r.reward})
    return out


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
        w_s = softmax over the prompt's kept sources of (best reward of s) / tau; they sum to 1 per prompt.
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
        list of pair dicts (see the module docstring).
    """
    if mode not in ("per_source", "global", "wrpo"):
        raise ValueError(f"mode must be 'per_source', 'global' or 'wrpo', got {mode!r}")
    if gap_min > gap_max:
        raise ValueError(f"gap_min ({gap_min}) must be <= gap_max ({gap_max})")
    if mode == "wrpo" and target_source is None:
        raise ValueError("mode='wrpo' needs target_source (the name of the target model's source)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def in_window(hi: Response, lo: Response) -> bool:
        gap = hi.reward - lo.reward
        return gap > 0 and gap_min <= gap <= gap_max

    out: list[dict[str, Any]] = []
    for rec in _records(records):
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
            weights = _softmax([b.reward for b, _, _ in pairs], temperature) if pairs else []
        for (best, worst, source), w in zip(pairs, weights, strict=True):
            p = _pair(rec.prompt, best, worst, w, source)
            if target_best is not None:
                p["target_chosen"], p["target_chosen_reward"] = target_best.text, target_best.reward
            out.append(p)
    return out


def rloo_groups(records: Iterable[PreferenceRecord | dict], *, temperature: float | None = None) -> list[dict]:
    """RLOO items: one group per prompt with two or more responses (a single response has no leave-one-out baseline).

    Args:
        records: records or their dicts.
        temperature: None for unit weights; else w_j = K * softmax(r_j / tau) over the group (mean weight 1).

    Returns:
        list of {prompt, responses: [str], rewards: [float], weights: [float], sources: [str]}.
    """
    out = []
    for rec in _records(records):
        if len(rec.responses) < 2:
            continue
        rewards = [r.reward for r in rec.responses]
        k = len(rewards)
        weights = [1.0] * k if temperature is None else [k * w for w in _softmax(rewards, temperature)]
        out.append(
            {
                "prompt": rec.prompt,
                "responses": [r.text for r in rec.responses],
                "rewards": rewards,
                "weights": weights,
                "sources": [r.source for r in rec.responses],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reference log-probs: computed once with the frozen reference model, cached on disk keyed by model + data.

_REF_FIELDS = {"chosen": "ref_chosen_logp", "rejected": "ref_rejected_logp", "target_chosen": "ref_target_chosen_logp"}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's config and weights (name, shape, dtype, sum and abs-sum of every parameter)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode() if hasattr(cfg, "to_json_string") else repr(cfg).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            stats = torch.stack([p.double().sum(), p.double().abs().sum()]).tolist()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{stats[0]:.17g}|{stats[1]:.17g}".encode())
    return h.hexdigest()


def _text_key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()


def _pairs_of(items: Sequence[dict]) -> list[tuple[str, str]]:
    texts = []
    for i, it in enumerate(items):
        if "prompt" not in it:
            raise ValueError(f"items[{i}] has no 'prompt'")
        if "responses" in it:
            texts += [(it["prompt"], r) for r in it["responses"]]
        elif "response" in it:
            texts.append((it["prompt"], it["response"]))
        else:
            texts += [(it["prompt"], it[k]) for k in _REF_FIELDS if k in it]
    return texts


def precompute_reference_logps(
    ref_model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    encode_kwargs: dict | None = None,
    model_id: str | None = None,
) -> list[dict]:
    """Add the reference model's summed log-probs to every item (pair, group or SFT item), using a disk cache.

    Pair items get ref_chosen_logp, ref_rejected_logp (and ref_target_chosen_logp); group items get ref_logps
    (one per response); SFT items get ref_logp. The cache file
    `<cache_dir>/ref_logps-<sha256(model fingerprint, tokenisation, texts)[:20]>.json` is written atomically
    (temp file, then rename) and reused when the model, the tokenisation settings and the texts are the same.

    Args:
        ref_model: the frozen reference causal LM.
        tokenizer: its tokenizer.
        items: dicts from `build_pairs`, `rloo_groups` or `sft_examples`.
        cache_dir: where to cache (None: no cache).
        batch_size: sequences per forward.
        encode_kwargs: keyword arguments of `encode_example` (max_length, max_prompt_length, chat_template).
        model_id: a stable identity of the model to hash instead of its weights (e.g. a checkpoint path+revision).

    Returns:
        new item dicts with the reference fields added (inputs untouched).
    """
    from h3fusion.trainers.sequence_logprobs import collate_examples, encode_example, sequence_logprobs

    encode_kwargs = dict(encode_kwargs or {})
    texts = _pairs_of(items)
    unique = sorted({_text_key(p, r): (p, r) for p, r in texts}.items())
    path = None
    table: dict[str, float] = {}
    if cache_dir is not None:
        h = hashlib.sha256()
        h.update((model_id or model_fingerprint(ref_model)).encode())
        h.update(json.dumps(encode_kwargs, sort_keys=True).encode())
        h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.eos_token_id}".encode())
        for k, _ in unique:
            h.update(k.encode())
        path = Path(cache_dir) / f"ref_logps-{h.hexdigest()[:20]}.json"
        if path.exists():
            table = json.loads(path.read_text(encoding="utf-8"))["logps"]
    todo = [(k, pr) for k, pr in unique if k not in table]
    if todo:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(ref_model.parameters()).device
        was_training = ref_model.training
        ref_model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(todo), batch_size):
                    chunk = todo[s : s + batch_size]
                    enc = [encode_example(tokenizer, p, r, **encode_kwargs) for _, (p, r) in chunk]
                    b = {k: v.to(device) for k, v in collate_examples(enc, pad).items()}
                    logps = sequence_logprobs(ref_model, b["input_ids"], b["attention_mask"], b["labels"]).logps
                    table.update(zip((k for k, _ in chunk), logps.tolist(), strict=True))
        finally:
            ref_model.train(was_training)
        if path is not None:
            _atomic_write_text(path, json.dumps({"version": 1, "logps": table}))
    out = []
    for it in items:
        it = dict(it)
        p = it["prompt"]
        if "responses" in it:
            it["ref_logps"] = [table[_text_key(p, r)] for r in it["responses"]]
        elif "response" in it:
            it["ref_logp"] = table[_text_key(p, it["response"])]
        else:
            for k, f in _REF_FIELDS.items():
                if k in it:
                    it[f] = table[_text_key(p, it[k])]
        out.append(it)
    return out
