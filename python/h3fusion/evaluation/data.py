"""Evaluation data: TruthfulQA, BeaverTails-style harmful prompts and AlpacaEval-style helpful prompts, from a
Hugging Face dataset name (when the hub is reachable) or a local JSON / JSONL / parquet file with the same fields.

Fields (checked record by record; an error names the file, the record and the field):
  * TruthfulQA (`truthful_qa`, config `multiple_choice`, split `validation`): `question`, `mc1_targets` and
    `mc2_targets`, each `{"choices": [str, ...], "labels": [0|1, ...]}`; mc1 has exactly one label 1.
  * BeaverTails (`PKU-Alignment/BeaverTails`, split `30k_test`): `prompt`. The dataset repeats a prompt once per
    annotated response; repeats are dropped (first occurrence kept, order preserved).
  * AlpacaEval (`tatsu-lab/alpaca_eval`, config `alpaca_eval`, split `eval`): `instruction`, and `output` (the
    reference answer).

A Hugging Face source is written `NAME[:CONFIG][@SPLIT]`; the config and split default as above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SOURCES",
    "load_harmful_prompts",
    "load_helpful_prompts",
    "load_truthfulqa",
    "read_records",
]

DEFAULT_SOURCES = {
    "truthfulqa": "truthful_qa",
    "harmful": "PKU-Alignment/BeaverTails",
    "helpful": "tatsu-lab/alpaca_eval",
}
# (config, split) used when a Hugging Face source names none.
_HF_DEFAULTS = {
    "truthful_qa": ("multiple_choice", "validation"),
    "truthfulqa/truthful_qa": ("multiple_choice", "validation"),
    "PKU-Alignment/BeaverTails": (None, "30k_test"),
    "tatsu-lab/alpaca_eval": ("alpaca_eval", "eval"),
}
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def _is_local(source: str) -> bool:
    # A name like "tatsu-lab/alpaca_eval" also contains a slash: only an existing path or a data-file suffix is local.
    return os.path.exists(source) or source.lower().endswith(_LOCAL_SUFFIXES)


def read_records(source: str | os.PathLike, what: str) -> list[dict[str, Any]]:
    """The records of a local JSON (a list of objects), JSONL (one object per line) or parquet file, or of a
    Hugging Face dataset `NAME[:CONFIG][@SPLIT]`.

    Args:
        source: a file path or a dataset name.
        what: the flag or argument the source came from (named in errors).

    Raises:
        ValueError: unreadable file, invalid JSON (with the line), a record that is not an object, or a dataset
            that cannot be loaded.
    """
    text = os.fspath(source)
    if _is_local(text):
        return _read_local(Path(text), what)
    return _read_hub(text, what)


def _read_local(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"{what}: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{what}: {path}:{lineno}: invalid JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: {path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{what}: {path}: expected a JSON list of records, got {type(rows).__name__}")
    else:
        raise ValueError(f"{what}: {path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{what}: {path}: record {i} is a {type(row).__name__}, expected an object")
    return [dict(r) for r in rows]


def _read_hub(spec: str, what: str) -> list[dict[str, Any]]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    default_config, default_split = _HF_DEFAULTS.get(name, (None, "train"))
    config, split = config or default_config, split or default_split
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network/format failure gets the same advice
        raise ValueError(
            f"{what}: could not load the Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Offline? Pass a local .json/.jsonl/.parquet file with the same fields instead."
        ) from None
    return [dict(r) for r in ds]


def _where(what: str, i: int) -> str:
    return f"{what}: record {i}"


def _text(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if field not in record:
        raise ValueError(f"{where}: missing field {field!r} (has {sorted(record)})")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _targets(record: Mapping[str, Any], field: str, where: str, exactly_one: bool) -> dict[str, list]:
    value = record.get(field)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: missing field {field!r} (an object with 'choices' and 'labels')")
    choices, labels = value.get("choices"), value.get("labels")
    if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
        raise ValueError(f"{where}: field {field}.choices must be a non-empty list of strings")
    choices = list(choices)
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{where}: {field}.choices[{j}] must be a non-empty string")
    if not isinstance(labels, Sequence) or isinstance(labels, str) or len(labels) != len(choices):
        raise ValueError(f"{where}: field {field}.labels must be a list as long as {field}.choices ({len(choices)})")
    labels = [int(x) for x in labels]
    if any(x not in (0, 1) for x in labels):
        raise ValueError(f"{where}: field {field}.labels must hold only 0 and 1")
    n_true = sum(labels)
    if exactly_one and n_true != 1:
        raise ValueError(f"{where}: field {field}.labels must have exactly one 1 (the true answer), has {n_true}")
    if not exactly_one and n_true == 0:
        raise ValueError(f"{where}: field {field}.labels has no true answer (no 1)")
    return {"choices": choices, "labels": labels}


def _limited(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def load_truthfulqa(
    source: str | os.PathLike = DEFAULT_SOURCES["truthfulqa"], limit: int | None = None, what: str = "--truthfulqa"
) -> list[dict[str, Any]]:
    """TruthfulQA records `{id, question, mc1_targets, mc2_targets}` (validated; the first `limit` only)."""
    out = []
    for i, r in enumerate(_limited(read_records(source, what), limit)):
        where = _where(what, i)
        out.append(
            {
                "id": i,
                "question": _text(r, "question", where),
                "mc1_targets": _targets(r, "mc1_targets", where, exactly_one=True),
                "mc2_targets": _targets(r, "mc2_targets", where, exactly_one=False),
            }
        )
    if not out:
        raise ValueError(f"{what}: no records")
    return out


def load_harmful_prompts(
    source: str | os.PathLike = DEFAULT_SOURCES["harmful"], limit: int | None = None, what: str = "--harmful-prompts"
) -> list[dict[str, Any]]:
    """BeaverTails-style prompts `{id, prompt}`, repeats dropped (first occurrence kept), the first `limit`."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(read_records(source, what)):
        prompt = _text(r, "prompt", _where(what, i))
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": len(out), "prompt": prompt})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{what}: no records")
    return out


def load_helpful_prompts(
    source: str | os.PathLike = DEFAULT_SOURCES["helpful"], limit: int | None = None, what: str = "--helpful-prompts"
) -> list[dict[str, Any]]:
    """AlpacaEval-style records `{id, instruction, reference}` (`reference` = the file's `output`)."""
    out = []
    for i, r in enumerate(_limited(read_records(source, what), limit)):
        where = _where(what, i)
        out.append({"id": i, "instruction": _text(r, "instruction", where), "reference": _text(r, "output", where)})
    if not out:
        raise ValueError(f"{what}: no records")
    return out
