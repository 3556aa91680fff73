"""Reference log-probs for FusePO: computed once with the frozen reference model, cached on disk keyed by model,
tokenisation and texts.

Lives with the trainers (it runs a model through `sequence_logprobs`), so `h3fusion.data` stays free of models and
of any import from `h3fusion.trainers`. Which item field receives which log-prob: `h3fusion.data.pair_layout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.pair_layout import GROUP_REF_FIELD, PAIR_FIELDS, REF_ITEM_FIELD, SFT_REF_FIELD
from ..data.tokens import pad_token_id
from ..utils.files import atomic_write_json
from .sequence_logprobs import collate_examples, encode_example, sequence_logprobs

__all__ = ["model_fingerprint", "precompute_reference_logps"]

_CACHE_VERSION = 1


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


def _texts_of(items: Sequence[dict]) -> list[tuple[str, str]]:
    texts = []
    for i, it in enumerate(items):
        if "prompt" not in it:
            raise ValueError(f"items[{i}] has no 'prompt'")
        if "responses" in it:
            texts += [(it["prompt"], r) for r in it["responses"]]
        elif "response" in it:
            texts.append((it["prompt"], it["response"]))
        else:
            texts += [(it["prompt"], it[f]) for f in PAIR_FIELDS if f in it]
    return texts


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _read_cache(path: Path) -> dict[str, float]:
    """The cached {text key: log-prob} table, or {} (with a warning) when the file is unreadable or malformed, so
    a corrupted cache (a crash of another writer, a disk error, a hand edit) is rebuilt rather than fatal."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        table = data["logps"] if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else None
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in table.items()
        ):
            raise ValueError("not a reference log-prob table")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        warnings.warn(f"reference log-prob cache {path} is unreadable ({exc}); recomputing it", stacklevel=3)
        return {}
    return {k: float(v) for k, v in table.items()}


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

    Pair items get `REF_ITEM_FIELD[f]` for each text field f (ref_chosen_logp, ref_rejected_logp,
    ref_target_chosen_logp); group items get ref_logps (one per response); SFT items get ref_logp. The cache file
    `<cache_dir>/ref_logps-<sha256(model fingerprint, tokenisation, texts)[:20]>.json` is written atomically and
    reused when the model, the tokenisation settings and the texts are the same; a corrupted one is recomputed (with
    a warning) and rewritten.

    Under torch.distributed (torchrun / accelerate), EVERY rank must call this with the same items: the texts to
    compute are split over the ranks and the results gathered once (`all_gather_object`); rank 0 writes the cache.

    Args:
        ref_model: the frozen reference causal LM.
        tokenizer: its tokenizer.
        items: dicts from `build_pairs`, `rloo_groups` or `sft_examples`.
        cache_dir: where to cache (None: no cache).
        batch_size: sequences per forward.
        encode_kwargs: keyword arguments of `encode_example` (max_length, max_prompt_length, chat_template).
        model_id: a stable identity of the model to hash instead of its weights (e.g. a checkpoint path+revision).

    Returns:
        new item dicts with the reference fields added (inputs untouched); log-probs are python floats.
    """
    encode_kwargs = dict(encode_kwargs or {})
    unique = sorted({_text_key(p, r): (p, r) for p, r in _texts_of(items)}.items())
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
            table = _read_cache(path)
    todo = [(k, pr) for k, pr in unique if k not in table]
    rank, world = _rank_and_world()
    if world > 1:
        # split over ranks (strided, so every rank gets a similar mix of lengths), gathered once below; the gather
        # is also the point every rank passes only after all have read the cache (none sees this call's write)
        todo = todo[rank::world]
    computed: dict[str, float] = {}
    if todo:
        pad = pad_token_id(tokenizer)
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
                    computed.update(zip((k for k, _ in chunk), logps.tolist(), strict=True))
        finally:
            ref_model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        parts: list[dict[str, float] | None] = [None] * world
        dist.all_gather_object(parts, computed)
        computed = {k: v for part in parts for k, v in (part or {}).items()}
    table.update(computed)
    if computed and path is not None and rank == 0:
        atomic_write_json(path, {"version": _CACHE_VERSION, "logps": table}, indent=None)
    out = []
    for it in items:
        it = dict(it)
        p = it["prompt"]
        if "responses" in it:
            it[GROUP_REF_FIELD] = [table[_text_key(p, r)] for r in it["responses"]]
        elif "response" in it:
            it[SFT_REF_FIELD] = table[_text_key(p, it["response"])]
        else:
            for f in PAIR_FIELDS:
                if f in it:
                    it[REF_ITEM_FIELD[f]] = table[_text_key(p, it[f])]
        out.append(it)
    return out
