"""Scoring every (prompt, response) with a reward model (`h3fusion score`).

The reward model is a transformers sequence classifier (`AutoModelForSequenceClassification`, e.g. Skywork-Reward,
ArmoRM's head index 0): each conversation [prompt turns..., assistant: response] is formatted with the reward
model's OWN chat template, right-padded into batches, and its reward is the classifier output at `reward_index`
(the only output when the head has one). Models that ship their own modelling code load only with
`trust_remote_code=True`, which the user must ask for.

Resumable: scored records are appended record by record to `<out>.work/scored.jsonl`, which is renamed to `out`
when every record is scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .outputs import ResumableOutput
from .records import (
    JsonlAppender,
    dir_fingerprint,
    file_sha256,
    read_jsonl_objects,
    read_jsonl_resumable,
    validate_sampled_record,
)

__all__ = ["RewardModel", "load_sampled_records", "reward_summary", "score_file"]


def load_sampled_records(path: str | os.PathLike) -> list[dict]:
    """Read and validate sampled records (see `h3fusion.fuserl.records`); errors name file:line and the field."""
    return [validate_sampled_record(d, where) for where, d in read_jsonl_objects(path, "sampled records")]


class RewardModel:
    """A reward model folder loaded for scoring.

    Args:
        path: the model folder (a sequence-classification checkpoint with a tokenizer that has a chat template).
        device: torch device.
        reward_index: which classifier output is the reward (None: the head must have exactly one output).
        trust_remote_code: allow the folder's own modelling code.
        dtype: "auto", "float32", "bfloat16" or "float16".
        max_length: longer conversations keep their last `max_length` tokens (None: no limit).

    Raises:
        ValueError: no chat template, no scoring head in the checkpoint, custom code without trust_remote_code,
            or an output index the head does not have; each message names the model folder.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        reward_index: int | None = None,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        max_length: int | None = None,
    ):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path, self.device, self.max_length = path, device, max_length
        if not Path(path).is_dir():
            raise FileNotFoundError(f"reward model {path}: not a directory")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not trust_remote_code:
                raise ValueError(
                    f"reward model {path} needs its own modelling code; pass --trust-remote-code "
                    "(trust_remote_code: true) if you trust that code"
                ) from None
            raise
        if getattr(config, "auto_map", None) and not trust_remote_code:
            raise ValueError(
                f"reward model {path} ships its own modelling code (auto_map in config.json); pass "
                "--trust-remote-code (trust_remote_code: true) if you trust that code"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"reward model {path} has no chat template: it must format (prompt, response) the way "
                "it was trained; add its template to the tokenizer"
            )
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        except ValueError as exc:
            raise ValueError(f"reward model {path} is not a sequence classifier transformers can load: {exc}") from None
        missing = [k for k in info.get("missing_keys", []) if _is_head_key(model, k)]
        if missing:
            raise ValueError(
                f"reward model {path} has no scoring head: the checkpoint lacks {sorted(missing)} (a plain language "
                "model or a base model, not a trained reward model); use a sequence-classification reward model"
            )
        n_out = int(model.config.num_labels)
        if reward_index is None:
            if n_out != 1:
                raise ValueError(
                    f"reward model {path} outputs {n_out} values per sequence; choose the reward with "
                    "--reward-index (reward_index)"
                )
            reward_index = 0
        if not 0 <= reward_index < n_out:
            raise ValueError(f"reward model {path}: reward_index {reward_index} is outside its {n_out} outputs")
        self.reward_index = reward_index
        self.tokenizer.padding_side = "right"
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if model.config.pad_token_id is None:
            # HF's classifiers find each row's last token through pad_token_id; without one, batches > 1 fail
            model.config.pad_token_id = pad
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.model = model.to(device).eval()
        self.truncated = 0

    def encode(self, messages: list[dict[str, str]], response: str) -> list[int]:
        conv = [*messages, {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(conv, tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.max_length is not None and len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[-self.max_length :]
        return ids

    def score(self, items: Sequence[tuple[list[dict[str, str]], str]]) -> list[float]:
        """items: (prompt messages, response text) -> one float reward each (one forward pass, right padding)."""
        import torch

        encoded = [self.encode(m, r) for m, r in items]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        rewards = logits[:, self.reward_index].float().tolist()
        for (m, _), r in zip(items, rewards, strict=True):
            if not math.isfinite(r):
                raise ValueError(
                    f"reward model {self.path} gave a non-finite reward ({r}) for prompt {m[-1]['content'][:60]!r}"
                )
        return rewards


def _is_head_key(model: Any, key: str) -> bool:
    # the head is whatever is not the base model: for XForSequenceClassification, keys outside `base_model_prefix`
    prefix = getattr(model, "base_model_prefix", "") or ""
    return not (prefix and key.startswith(prefix + "."))


def reward_summary(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per source: count, mean, std (population), min, max of the rewards."""
    by: dict[str, list[float]] = {}
    for rec in records:
        for r in rec["responses"]:
            by.setdefault(r["source"], []).append(float(r["reward"]))
    out = {}
    for source, vals in by.items():
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out[source] = {"count": len(vals), "mean": mean, "std": std, "min": min(vals), "max": max(vals)}
    return out


def _messages(rec: dict) -> list[dict[str, str]]:
    return rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]


def score_file(
    reward_model: str,
    in_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    reward_index: int | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    max_length: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    histogram: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score every response of the sampled records in `in_path` and write the scored records to `out`.

    Writes `<out>.meta.json` (settings and summary) and, with `histogram`, `<out>.rewards.png`.

    Returns:
        the summary: records, responses, per-source reward statistics (`reward_summary`), truncated conversations,
        and "skipped": True when `out` was already complete for the same inputs and settings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = load_sampled_records(in_path)
    if not records:
        raise ValueError(f"{in_path}: no records to score")
    identity = {
        "reward_model": {"path": os.path.abspath(reward_model), "fingerprint": dir_fingerprint(reward_model)},
        "input": file_sha256(in_path),
        "reward_index": reward_index,
        "dtype": dtype,
        "max_length": max_length,
    }
    output = ResumableOutput(out, "score", identity, overwrite=overwrite, inputs=[in_path, reward_model])
    if output.is_complete() and not overwrite:
        return {**output.read_meta()["summary"], "skipped": True}
    # load (and so check) the reward model before anything is written
    rm = RewardModel(
        reward_model,
        device=device,
        reward_index=reward_index,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        max_length=max_length,
    )
    work = output.begin()
    if work is None:
        return {**output.read_meta()["summary"], "skipped": True}
    partial = work / "scored.jsonl"
    done = len(read_jsonl_resumable(partial))
    if done > len(records):
        raise ValueError(f"{partial} holds more records ({done}) than {in_path} ({len(records)}); pass --overwrite")
    with JsonlAppender(partial) as sink:
        i = done
        while i < len(records):
            # whole records per batch, so a record is appended as soon as its responses are scored
            chunk, rows = [], 0
            while i < len(records) and (not chunk or rows + len(records[i]["responses"]) <= batch_size):
                chunk.append(records[i])
                rows += len(records[i]["responses"])
                i += 1
            items = [(_messages(rec), r["text"]) for rec in chunk for r in rec["responses"]]
            rewards = [v for s in range(0, len(items), batch_size) for v in rm.score(items[s : s + batch_size])]
            k = 0
            for rec in chunk:
                scored = dict(rec)
                scored["responses"] = [{**r, "reward": rewards[k + j]} for j, r in enumerate(rec["responses"])]
                k += len(rec["responses"])
                sink.append(scored)
            if progress is not None:
                progress(i, len(records))
    scored_records = read_jsonl_resumable(partial)
    os.replace(partial, out)
    summary = {
        "records": len(scored_records),
        "responses": sum(len(r["responses"]) for r in scored_records),
        "rewards": reward_summary(scored_records),
        "truncated": rm.truncated,
    }
    if histogram:
        from .report import plot_reward_histogram

        plot_reward_histogram(scored_records, f"{out}.rewards.png", title=f"rewards ({Path(reward_model).name})")
    output.finish(summary)
    return summary
