"""Sampling K responses per prompt from each source model, reproducibly and resumably (`h3fusion sample`).

Every response has its own seed, derived from (base seed, source, prompt id, sample index); its random draws come
from a generator of that seed only, so a response does not depend on the batch it was generated in, and a rerun or
a resumed run reproduces it. With the Hugging Face backend, `model.generate` runs with the KV cache on left-padded
batches; the sampling itself (temperature, top-p) happens in `SeededSampler`, a logits processor that draws each
row's token by inverse-CDF sampling with the row's generator and leaves generate's greedy step only that token.

Sources are sampled one after the other (one model in memory at a time); each source's responses are appended prompt
by prompt to `<out>.work/<source>.jsonl`; the final file joins them per prompt once every source is done.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text
from .outputs import ResumableOutput
from .records import (
    JsonlAppender,
    Prompt,
    dir_fingerprint,
    file_sha256,
    load_prompts,
    read_jsonl_resumable,
    validate_source_name,
    write_jsonl_lines,
)

__all__ = ["SampleSettings", "SeededSampler", "EmptyGenerationError", "sample_seed", "sample_to_file"]


class EmptyGenerationError(ValueError):
    """A source model produced an empty (or whitespace-only) response and the policy is on_empty="error"."""


@dataclass
class SampleSettings:
    """Generation settings of `h3fusion sample`.

    Attributes:
        n: samples per prompt per source (K).
        temperature: softmax temperature; 0 means greedy (then the K samples are identical).
        top_p: nucleus mass in (0, 1].
        max_new_tokens: new-token budget per response.
        min_new_tokens: EOS is forbidden before this many new tokens (1 avoids most empty responses).
        seed: base seed of the per-response seeds.
        batch_size: rows (prompt x sample) per generate call; does not change the results.
        backend: "hf", "vllm" or "auto" (vllm when importable).
        dtype: model dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        on_empty: an empty response is an "error" (naming source, prompt and sample) or is "drop"ped (counted).
    """

    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    min_new_tokens: int = 1
    seed: int = 0
    batch_size: int = 16
    backend: str = "auto"
    dtype: str = "auto"
    on_empty: str = "error"

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError("need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"backend must be 'auto', 'hf' or 'vllm', got {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.on_empty not in ("error", "drop"):
            raise ValueError(f"on_empty must be 'error' or 'drop', got {self.on_empty!r}")

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("backend 'vllm' requested but vllm is not installed")
        return self.backend

    def identity(self) -> dict[str, Any]:
        """The settings that determine the responses (batch size and the empty-response policy do not)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("on_empty")
        d["backend"] = self.resolved_backend()
        return d


def sample_seed(base_seed: int, source: str, prompt_id: int, sample: int) -> int:
    """The seed of one response: a 63-bit hash of (base seed, source name, prompt id, sample index)."""
    key = f"{base_seed}|{source}|{prompt_id}|{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


class SeededSampler:
    """A transformers logits processor that samples each row with its own generator (see the module docstring).

    Returns scores that are -inf everywhere but the drawn token, so generate's greedy step picks it.

    Args:
        seeds: one seed per batch row.
        prompt_length: the (left-padded) prompt length, to count new tokens.
        temperature, top_p, min_new_tokens: as in `SampleSettings`.
        eos_token_ids: tokens forbidden before min_new_tokens.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        prompt_length: int,
        temperature: float,
        top_p: float,
        min_new_tokens: int,
        eos_token_ids: Sequence[int],
    ):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.prompt_length = prompt_length
        self.temperature, self.top_p, self.min_new_tokens = temperature, top_p, min_new_tokens
        self.eos = list(eos_token_ids)

    def __call__(self, input_ids, scores):
        """input_ids: int64 [B, L]; scores: float [B, V] next-token logits -> float [B, V]."""
        import torch

        scores = scores.float().clone()
        if input_ids.shape[1] - self.prompt_length < self.min_new_tokens and self.eos:
            scores[:, self.eos] = float("-inf")
        # one uniform per row and step, drawn even in greedy mode so a row's stream never depends on the others
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        if self.temperature == 0:
            choice = scores.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(scores.double() / self.temperature, -1)
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
            before = sorted_p.cumsum(-1) - sorted_p
            sorted_p = sorted_p * (before < self.top_p)  # the smallest prefix whose mass reaches top_p
            cdf = sorted_p.cumsum(-1)
            target = u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]
            pos = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[1] - 1)
            # never land on a token outside the nucleus (cdf plateaus there)
            pos = torch.minimum(pos, (sorted_p > 0).sum(-1, keepdim=True) - 1)
            choice = order.gather(1, pos)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice, 0.0)
        return out


def _require_chat_template(tokenizer: Any, name: str, path: str, role: str = "source model") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{role} {name!r} ({path}) has no chat template: its tokenizer defines none (tokenizer_config.json "
            "'chat_template' or chat_template.jinja); FuseRL formats every prompt with the model's own template"
        )


def _check_tokenizers(sources: Mapping[str, str]) -> None:
    from transformers import AutoTokenizer

    for name, path in sources.items():
        _require_chat_template(AutoTokenizer.from_pretrained(path), name, path)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gen_eos, tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


class HFGenerator:
    """Batched sampling from one causal LM directory with transformers' `generate` (KV cache, left padding)."""

    def __init__(self, name: str, path: str, settings: SampleSettings, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.name, self.settings, self.device = name, settings, device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        _require_chat_template(self.tokenizer, name, path)
        dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.eos = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        # generate() fills every setting we leave unset from the checkpoint's generation_config (its temperature,
        # repetition penalty, ...): replace it, so the responses follow our settings only
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos or None, pad_token_id=self.pad)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, rows: Sequence[tuple[Prompt, int, int]]) -> list[dict[str, Any]]:
        """rows: (prompt, sample index, seed) -> one {"text", "finish", "new_tokens"} per row."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        s = self.settings
        encoded = [self.prompt_ids(p) for p, _, _ in rows]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, e in enumerate(encoded):  # left padding: every row's last prompt token sits at the same position
            ids[i, length - len(e) :] = torch.tensor(e)
            mask[i, length - len(e) :] = 1
        sampler = SeededSampler(
            [seed for _, _, seed in rows], length, s.temperature, s.top_p, s.min_new_tokens, self.eos
        )
        config = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos or None,
            pad_token_id=self.pad,
            use_cache=True,
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        results = []
        for row in out[:, length:].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.eos), None)
            tokens = row if stop is None else row[:stop]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append({"text": text, "finish": "length" if stop is None else "stop", "new_tokens": len(tokens)})
        return results

    def close(self) -> None:
        import torch

        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMGenerator:
    """The same contract on vLLM (used when vllm is installed): one request per row with the row's seed."""

    def __init__(self, name: str, path: str, settings: SampleSettings, device: str):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.name, self.settings = name, settings
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        _require_chat_template(self.tokenizer, name, path)
        self.llm = LLM(model=path, dtype=settings.dtype, seed=settings.seed)

    def generate(self, rows: Sequence[tuple[Prompt, int, int]]) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        s = self.settings
        texts = [
            self.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
            for p, _, _ in rows
        ]
        params = [
            SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens,
                seed=seed,
            )
            for _, _, seed in rows
        ]
        outs = self.llm.generate(texts, params, use_tqdm=False)
        return [
            {
                "text": o.outputs[0].text,
                "finish": "length" if o.outputs[0].finish_reason == "length" else "stop",
                "new_tokens": len(o.outputs[0].token_ids),
            }
            for o in outs
        ]

    def close(self) -> None:
        del self.llm


def _sample_source(
    gen: Any,
    name: str,
    prompts: Sequence[Prompt],
    settings: SampleSettings,
    part: Path,
    progress: Callable[[str, int, int], None] | None,
) -> int:
    """Append the K responses of each prompt not yet in `part`; returns the number of dropped empty responses."""
    done = read_jsonl_resumable(part)
    for i, line in enumerate(done):
        if line.get("id") != prompts[i].id:
            raise ValueError(f"{part}:{i + 1}: expected prompt id {prompts[i].id}, found {line.get('id')!r}")
    dropped = sum(line.get("dropped_empty", 0) for line in done)
    per_batch = max(1, settings.batch_size // settings.n)
    todo = prompts[len(done) :]
    with JsonlAppender(part) as sink:
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            rows = [(p, j, sample_seed(settings.seed, name, p.id, j)) for p in chunk for j in range(settings.n)]
            results = gen.generate(rows)
            for k, p in enumerate(chunk):
                responses, empty = [], 0
                for (_, j, seed), r in zip(
                    rows[k * settings.n : (k + 1) * settings.n],
                    results[k * settings.n : (k + 1) * settings.n],
                    strict=True,
                ):
                    if not r["text"].strip():
                        if settings.on_empty == "error":
                            raise EmptyGenerationError(
                                f"source model {name!r} generated an empty response for prompt {p.id} "
                                f"({p.text[:60]!r}), sample {j} (seed {seed}, {r['new_tokens']} new tokens); "
                                "raise min_new_tokens, check the model's chat template, or use on_empty='drop'"
                            )
                        empty += 1
                        continue
                    responses.append(
                        {
                            "source": name,
                            "text": r["text"],
                            "sample": j,
                            "seed": seed,
                            "finish": r["finish"],
                            "new_tokens": r["new_tokens"],
                        }
                    )
                sink.append({"id": p.id, "responses": responses, **({"dropped_empty": empty} if empty else {})})
                dropped += empty
                if progress is not None:
                    progress(name, len(done) + start + k + 1, len(prompts))
    return dropped


def sample_to_file(
    sources: Mapping[str, str],
    prompts_path: str | os.PathLike,
    out: str | os.PathLike,
    settings: SampleSettings,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Sample `settings.n` responses per prompt from every source model and write the records to `out`.

    Resumes an unfinished run of the same settings (sources, their folders' fingerprints, the prompts file's bytes,
    the generation settings); does nothing when `out` is already complete for them.

    Args:
        sources: source name -> model folder (transformers causal LM with a chat template), in output order.
        prompts_path: prompts JSONL (see `h3fusion.fuserl.records`).
        out: the output JSONL file.
        settings: the generation settings.
        device: torch device of the HF backend.
        overwrite: replace an output or an unfinished run of other settings.
        progress: called as progress(source, prompts done, prompts total) after every appended prompt.

    Returns:
        the summary (also in `<out>.meta.json`): prompts, responses per source, dropped empty responses, finish
        reasons, mean new tokens per source, and "skipped": True when the output was already complete.
    """
    settings.validate()
    if not sources:
        raise ValueError("no source models given")
    for name, path in sources.items():
        validate_source_name(name)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"source model {name!r}: {path} is not a directory")
    prompts = load_prompts(prompts_path)
    identity = {
        "sources": {n: {"path": os.path.abspath(p), "fingerprint": dir_fingerprint(p)} for n, p in sources.items()},
        "prompts": file_sha256(prompts_path),
        "generation": settings.identity(),
    }
    output = ResumableOutput(out, "sample", identity, overwrite=overwrite, inputs=[prompts_path, *sources.values()])
    if output.is_complete() and not overwrite:
        return {**output.read_meta()["summary"], "skipped": True}
    _check_tokenizers(sources)  # every source's chat template, before anything is written
    work = output.begin()
    if work is None:
        return {**output.read_meta()["summary"], "skipped": True}
    backend = settings.resolved_backend()
    make = VLLMGenerator if backend == "vllm" else HFGenerator
    dropped: dict[str, int] = {}
    for name, path in sources.items():
        part = work / f"{name}.jsonl"
        if len(read_jsonl_resumable(part)) == len(prompts):
            dropped[name] = sum(line.get("dropped_empty", 0) for line in read_jsonl_resumable(part))
            continue
        gen = make(name, path, settings, device)
        try:
            dropped[name] = _sample_source(gen, name, prompts, settings, part, progress)
        finally:
            gen.close()
    parts = {name: read_jsonl_resumable(work / f"{name}.jsonl") for name in sources}
    records = []
    for i, p in enumerate(prompts):
        rec = p.to_record()
        rec["responses"] = [r for name in sources for r in parts[name][i]["responses"]]
        records.append(rec)
    atomic_write_text(out, write_jsonl_lines(records))
    summary = summarize_samples(records, list(sources))
    summary["dropped_empty"] = dropped
    summary["generation"] = {**asdict(settings), "backend": backend}
    output.finish(summary)
    return summary


def summarize_samples(records: Sequence[dict], sources: Sequence[str]) -> dict[str, Any]:
    """Counts of sampled records: prompts, and per source responses, finish reasons and mean new tokens."""
    per: dict[str, dict[str, Any]] = {s: {"responses": 0, "stop": 0, "length": 0, "new_tokens": 0} for s in sources}
    for rec in records:
        for r in rec["responses"]:
            d = per.setdefault(r["source"], {"responses": 0, "stop": 0, "length": 0, "new_tokens": 0})
            d["responses"] += 1
            d[r.get("finish", "stop")] = d.get(r.get("finish", "stop"), 0) + 1
            d["new_tokens"] += int(r.get("new_tokens", 0))
    for d in per.values():
        d["mean_new_tokens"] = d.pop("new_tokens") / d["responses"] if d["responses"] else 0.0
    return {"prompts": len(records), "per_source": per}
