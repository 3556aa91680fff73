"""Per-sample JSONL logs: appended as samples are produced, read back on a rerun so finished samples are skipped.

Each line is one JSON object with an integer `id` (the sample's index in its dataset). A run killed while writing
can leave a torn last line: it is dropped (and the file rewritten without it, atomically) when the log is opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text

__all__ = ["RunFolder", "SampleLog", "file_stem"]


class SampleLog:
    """A resumable per-sample log.

    Attributes:
        path: the JSONL file.
        done: id -> record, for every complete line on disk.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[int, dict[str, Any]] = {}
        if not self.path.exists():
            return
        good, torn = [], False
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    torn = True  # the last write was cut short
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn = True
                    break
                good.append(line)
                self.done[int(record["id"])] = record
        if torn:
            atomic_write_text(self.path, "".join(good))

    def missing(self, items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The items (dicts with `id`) not yet in the log, in order."""
        return [it for it in items if int(it["id"]) not in self.done]

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (each with `id`) and flush them to disk."""
        lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        for line in lines:
            record = json.loads(line)
            self.done[int(record["id"])] = record

    def get(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """The records of `ids`, in that order (KeyError names a missing id)."""
        out = []
        for i in ids:
            if i not in self.done:
                raise KeyError(f"{self.path}: no record for sample {i}")
            out.append(self.done[i])
        return out


def file_stem(name: str) -> str:
    """A model name as a file-name part: runs of characters other than letters, digits, `.`, `_`, `-` become `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


class RunFolder:
    """An evaluation's output folder: its per-sample logs (`<model>.<stage>.jsonl`) and progress lines."""

    def __init__(self, out: Path, echo: Callable[[str], None], progress: bool):
        self.out, self.echo, self.progress = out, echo, progress

    def log(self, model: str, stage: str) -> SampleLog:
        """The log of one model's stage, read from disk now."""
        return SampleLog(self.out / f"{file_stem(model)}.{stage}.jsonl")

    def say(self, text: str) -> None:
        """A progress line (when progress is on)."""
        if self.progress:
            self.echo(text)
