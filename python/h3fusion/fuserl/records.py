"""Prompts, sampled records and append-only JSONL files for the FuseRL data stages.

Formats (one JSON object per line):

    prompts  {"prompt": str} or {"messages": [{"role", "content"}, ...]} (last turn from the user)
    sampled  {"id": int, "prompt": str[, "messages": [...]], "responses": [{"source", "text", "sample", "seed",
              "finish", "new_tokens"}, ...]}
    scored   the sampled record with "reward": float added to every response; valid input of `fuse-sft` /
             `fuse-po` (`h3fusion.data.preference.load_records` reads "prompt" and "responses" and ignores the rest)

`prompt` is the text the trainers format as one user turn; a multi-turn `messages` prompt is sampled and scored with
all its turns, and the trainers see its last user turn.

Long stages append one line per finished item to a JSONL file. A crash can leave a partial last line (no newline
yet); `read_jsonl_resumable` cuts it off, so a resumed run neither duplicates nor loses an item.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "JsonlAppender",
    "Prompt",
    "dir_fingerprint",
    "file_sha256",
    "load_prompts",
    "read_jsonl_resumable",
    "settings_hash",
    "validate_sampled_record",
    "validate_source_name",
]

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Prompt:
    """One prompt: its position in the prompts file, the chat messages to sample from and the trainers' text."""

    __slots__ = ("id", "messages", "text")

    def __init__(self, id: int, messages: list[dict[str, str]], text: str):
        self.id, self.messages, self.text = id, messages, text

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": self.id, "prompt": self.text}
        if len(self.messages) > 1:
            rec["messages"] = self.messages
        return rec


def _messages_of(d: dict, where: str) -> list[dict[str, str]]:
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the last of 'messages' must be a user turn, got role {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise ValueError(f"{where}: messages[{len(out) - 1}].content is empty")
    return out


def read_jsonl_objects(path: str | os.PathLike, what: str) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", parsed JSON) for each non-empty line of a JSONL file.

    Raises:
        FileNotFoundError: `path` is not a file (the message says which `what` it should have been).
        ValueError: a line is not valid JSON (the message names file:line).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (or is not a file)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read and validate a prompts JSONL file (see the module docstring); errors name file:line and the field.

    Returns:
        the prompts in file order; `Prompt.id` is the 0-based index among the file's non-empty lines.
    """
    prompts: list[Prompt] = []
    for where, d in read_jsonl_objects(path, "prompts"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with 'prompt' or 'messages'")
        if "messages" in d:
            msgs = _messages_of(d, where)
        elif isinstance(d.get("prompt"), str):
            if not d["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' is empty")
            msgs = [{"role": "user", "content": d["prompt"]}]
        else:
            raise ValueError(f"{where}: needs a string 'prompt' or a 'messages' list")
        prompts.append(Prompt(len(prompts), msgs, msgs[-1]["content"]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def validate_source_name(name: str) -> str:
    """A source name doubles as a file name: letters, digits, '_', '.', '-' (not starting with '.' or '-')."""
    if not isinstance(name, str) or not _SOURCE_NAME.match(name):
        raise ValueError(f"source name {name!r}: use letters, digits, '_', '.' and '-' only")
    return name


def validate_sampled_record(d: Any, where: str) -> dict:
    """Check a sampled (not yet scored) record: {"prompt": str, "responses": [{"source": str, "text": str}]}.

    Raises:
        ValueError: naming `where` and the field.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    if not isinstance(d.get("prompt"), str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    if "messages" in d:
        _messages_of(d, where)
    rs = d.get("responses")
    if not isinstance(rs, list):
        raise ValueError(f"{where}: 'responses' must be a list")
    for j, r in enumerate(rs):
        w = f"{where}.responses[{j}]"
        if not isinstance(r, dict):
            raise ValueError(f"{w}: expected an object")
        for key in ("text", "source"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{w}: '{key}' must be a string")
    return d


def read_jsonl_resumable(path: str | os.PathLike, *, repair: bool = True) -> list[dict]:
    """The complete lines of an append-only JSONL file.

    A last line without its newline is what a crash mid-append leaves: it is dropped (and, with `repair`, cut off
    the file so appends continue after the last complete line). A complete line that is not valid JSON is an error.

    Returns:
        the parsed objects ([] when the file does not exist).
    """
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb+" if repair else "rb") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:
            f.truncate(end)
    out = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}); the file is damaged") from None
    return out


class JsonlAppender:
    """Appends one JSON object per line, flushed and fsynced, so each line is either complete or absent after a
    crash. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, obj: Any) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def settings_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys): the identity of a stage's inputs and settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(path: str | os.PathLike, small: int = 1 << 20) -> str:
    """A cheap identity of a model folder: every file's relative name and size, and the bytes of files under `small`
    (configs, tokenizer, chat template). Large weight files are identified by name and size only, so hashing an
    8B checkpoint costs nothing; retraining into the same folder changes the sizes or configs in practice."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}|{size}\n".encode())
        if size < small:
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def write_jsonl_lines(objs: Iterable[Any]) -> str:
    """JSONL text of `objs` (for `h3fusion.utils.files.atomic_write_text`)."""
    return "".join(json.dumps(o, ensure_ascii=False, allow_nan=False) + "\n" for o in objs)
