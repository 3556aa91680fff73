"""Instruction data for H3Fusion training: records, loaders, category labels, tokenisation and the collator.

A record is `{instruction, input?, output, category}`. Local data is JSON (a list of records) or JSONL; the
paper's sources (Alpaca → helpful, BeaverTails 30k_train with is_safe → harmless, TruthfulQA generation →
honest) load through `datasets` when the Hugging Face hub is reachable (imported lazily).

Category names become expert indices through the fused model's config (its expert names), never through list
positions that shift when a category is missing or reordered (defect (f) of the original code).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .tokens import IGNORE_INDEX, response_token_ids

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)

__all__ = [
    "ALPACA_PROMPT",
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataset",
    "InstructionExample",
    "category_index",
    "expert_names_from_config",
    "format_prompt",
    "load_alpaca",
    "load_beavertails",
    "load_instructions",
    "load_paper_datasets",
    "load_truthfulqa",
    "save_instructions",
    "tokenize_instruction",
]


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example.

    Attributes:
        instruction: the request.
        output: the reference response (the only part trained with the LM loss).
        category: the category name (an expert name of the fused model, e.g. "helpful").
        input: optional context for the instruction ("" when none).
    """

    instruction: str
    output: str
    category: str
    input: str = ""

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], category: str | None = None, where: str = "record"):
        """Builds an example from a mapping; `category` fills in a missing category field."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected an object with instruction/output/category, got {type(record)}")
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{where}: field(s) {missing} missing or not a string")
        cat = record.get("category", category)
        if not isinstance(cat, str) or not cat:
            raise ValueError(f"{where}: no category (give the field or pass category=...)")
        inp = record.get("input") or ""
        if not isinstance(inp, str):
            raise ValueError(f"{where}: field 'input' must be a string")
        return cls(instruction=record["instruction"], output=record["output"], category=cat, input=inp)


def load_instructions(path: str | os.PathLike, category: str | None = None) -> list[InstructionExample]:
    """Loads examples from a JSON file (a list of records) or JSONL (one record per line).

    Args:
        path: `.json` or `.jsonl` file.
        category: category for records without one.

    Returns:
        the examples, in file order.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    records: list[Any]
    if path.endswith(".jsonl") or (stripped and stripped[0] == "{"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    else:
        records = json.loads(text) if stripped else []
        if isinstance(records, Mapping) and "data" in records:
            records = records["data"]
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
    return [InstructionExample.from_dict(r, category, where=f"{path}[{i}]") for i, r in enumerate(records)]


def save_instructions(examples: Iterable[InstructionExample], path: str | os.PathLike) -> None:
    """Writes examples as JSONL, atomically (temp file, then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The paper's sources (need the Hugging Face hub; `datasets` is imported only here)


def _load_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency of the venv
        raise ImportError("loading the paper's datasets needs `pip install datasets`") from exc
    return datasets.load_dataset(*args, **kwargs)


def load_alpaca(limit: int | None = None, name: str = "tatsu-lab/alpaca", category: str = "helpful"):
    """Alpaca (helpful): instruction, input, output."""
    ds = _load_dataset(name, split="train")
    out = []
    for row in ds:
        out.append(InstructionExample(row["instruction"], row["output"], category, row.get("input") or ""))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_beavertails(limit: int | None = None, name: str = "PKU-Alignment/BeaverTails", category: str = "harmless"):
    """BeaverTails `30k_train`, the rows with `is_safe == True` (harmless): prompt -> response."""
    ds = _load_dataset(name, split="30k_train")
    out = []
    for row in ds:
        if row["is_safe"] is True:
            out.append(InstructionExample(row["prompt"], row["response"], category))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_truthfulqa(
    part: str = "train", seed: int = 42, name: str = "truthfulqa/truthful_qa", category: str = "honest"
) -> list[InstructionExample]:
    """TruthfulQA generation (honest): the validation split halved into train/test with a fixed seed; one example
    per correct answer of each question (questions never cross the split)."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    ds = _load_dataset(name, "generation", split="validation")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    keep = order[:half] if part == "train" else order[half:]
    out = []
    for i in keep:
        row = ds[i]
        for answer in row["correct_answers"]:
            out.append(InstructionExample(row["question"], answer, category))
    return out


def load_paper_datasets(limit: int | None = None, seed: int = 42) -> dict[str, list[InstructionExample]]:
    """The paper's three training sets, keyed by category name."""
    return {
        "helpful": load_alpaca(limit),
        "harmless": load_beavertails(limit),
        "honest": load_truthfulqa("train", seed=seed)[:limit],
    }


# ---------------------------------------------------------------------------------------------------------------
# Category -> expert index


def expert_names_from_config(config: Any) -> list[str]:
    """The fused model's expert names, in expert order, from its config.

    `fuse_models` records them in the config's `h3fusion` dict (`experts`); `h3fusion_expert_names` or
    `expert_names` attributes work too. A config without them is an error rather than a guess from list positions.
    """
    if hasattr(config, "config") and not isinstance(config, Mapping):  # a model
        config = config.config
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    for key in ("h3fusion_expert_names", "expert_names"):
        names = get(key, None)
        if names:
            return [str(n) for n in names]
    meta = get("h3fusion", None)
    if isinstance(meta, Mapping):
        for key in ("experts", "expert_names"):
            if meta.get(key):
                return [str(n) for n in meta[key]]
    raise ValueError(
        "the model config names no experts (expected `h3fusion_expert_names`); fuse the model with "
        "h3fusion.fuse_models or pass expert_names explicitly"
    )


def category_index(expert_names: Sequence[str]) -> dict[str, int]:
    """{name: expert index}; duplicate names are an error."""
    index = {}
    for i, n in enumerate(expert_names):
        if n in index:
            raise ValueError(f"expert name {n!r} appears twice in {list(expert_names)}")
        index[n] = i
    return index


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def format_prompt(tokenizer: Any, example: InstructionExample, template: str | None = None) -> tuple[str, bool]:
    """The prompt text and whether it is already a chat-formatted string (then no extra special tokens).

    The tokenizer's chat template is used when it has one (one user turn, generation prompt added); otherwise the
    Alpaca template (or `template`, a str.format string with `{instruction}` and `{input}`).
    """
    user = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    if template is None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return text, True
    if template is None:
        template = ALPACA_PROMPT_WITH_INPUT if example.input else ALPACA_PROMPT
    return template.format(instruction=example.instruction, input=example.input), False


def tokenize_instruction(
    tokenizer: Any,
    example: InstructionExample,
    category_to_index: Mapping[str, int],
    *,
    max_length: int = 300,
    template: str | None = None,
) -> dict[str, Any]:
    """Tokenises prompt + response + EOS; the prompt carries label -100 (masked out of the LM loss).

    Too long examples keep the prompt's last tokens (at most half the budget when the response needs the rest) and
    cut the response's tail.

    Returns:
        {"input_ids": list[int], "labels": list[int], "category_labels": int}.
    """
    if example.category not in category_to_index:
        raise ValueError(
            f"category {example.category!r} is not an expert of the fused model (experts: {list(category_to_index)})"
        )
    prompt, chat = format_prompt(tokenizer, example, template)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=not chat)["input_ids"])
    response_ids = response_token_ids(tokenizer, example.output)  # one EOS, also when the output ends with it
    if len(prompt_ids) + len(response_ids) > max_length:
        prompt_budget = max(max_length - len(response_ids), max_length // 2)
        prompt_ids = prompt_ids[-prompt_budget:] if prompt_budget > 0 else []
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "category_labels": int(category_to_index[example.category]),
    }


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised examples (a list of dicts from `tokenize_instruction`), built eagerly once."""

    def __init__(
        self,
        examples: Sequence[InstructionExample],
        tokenizer: Any,
        expert_names: Sequence[str],
        *,
        max_length: int = 300,
        template: str | None = None,
    ):
        index = category_index(expert_names)
        self.examples = list(examples)
        self.features = [
            tokenize_instruction(tokenizer, ex, index, max_length=max_length, template=template) for ex in examples
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


class InstructionCollator:
    """Right-pads a batch to its longest example (not the dataset's).

    Returns tensors input_ids / labels / attention_mask [B, S] (int64; labels -100 and mask 0 on padding) and
    category_labels [B] (int64).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        b = len(features)
        input_ids = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            mask[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        if "category_labels" in features[0]:
            batch["category_labels"] = torch.tensor([int(f["category_labels"]) for f in features], dtype=torch.long)
        return batch
