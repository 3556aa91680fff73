"""The one home of the project's file-safety contract: atomic writes, output folders we may own, and run locks.

Rules every subcommand and API that writes follows:
  * a file is written under a temporary name in its own folder and renamed into place (`atomic_write_*`), so a
    crash never leaves a truncated file under the final name;
  * an output folder is ours to replace only when it is empty or carries our marker file (`OUTPUT_MARKER`), written
    when we create it; a folder of the user's, the working directory, or an input of the same run is never
    replaced or emptied (`prepare_output_dir`);
  * a long run holds an exclusive lock on its output folder (`output_lock`), so two runs never interleave their
    checkpoints; the second fails at once naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE",
    "OUTPUT_MARKER",
    "OutputDirError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_file",
    "is_our_output",
    "mark_output_dir",
    "output_lock",
    "prepare_output_dir",
    "to_json_safe",
]

OUTPUT_MARKER = ".h3fusion-output"
LOCK_FILE = ".h3fusion.lock"
# Files we put into every folder we own; a folder holding only these counts as empty.
_OWN_FILES = {OUTPUT_MARKER, LOCK_FILE}


class OutputDirError(ValueError):
    """An output path we must not write to (a user's folder, an input of the run, a file where a folder goes...)."""


# ---- atomic files ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename; returns the path.

    The parent folder is created if missing. On any error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json_safe(obj: Any) -> Any:
    """Replace non-finite floats (NaN, ±inf) by None, recursively, so the result is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as standard JSON (NaN/inf become null; never the non-standard `NaN` token), atomically."""
    text = json.dumps(to_json_safe(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Validate a file we will write later, before any work starts: not a folder; its parent exists or can be made.

    Raises:
        OutputDirError: naming `what`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{what}: {path} is a directory; expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputDirError(f"{what}: parent {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what}: cannot create the folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputDirError(f"{what}: the folder {parent} is not writable")
    return path


# ---- output folders ----------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder we wrote (it carries `OUTPUT_MARKER`)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def mark_output_dir(path: str | os.PathLike, kind: str) -> None:
    """Put our marker into a folder we own (`kind` names the subcommand that wrote it)."""
    marker = {"tool": "h3fusion", "kind": kind}
    (Path(path) / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "--out",
) -> Path:
    """Check (before any work starts) and create an output folder we may write into.

    Allowed: a path that does not exist (created, with the umask's normal permissions), an empty folder, or a
    previous output of ours (marker file present) when `overwrite` (its contents will be replaced) or `resume`
    (the run continues in it). Refused with `OutputDirError` naming `what`: a file, a non-empty folder without our
    marker, a previous output without `overwrite`/`resume`, the working directory or one of its parents, and any
    folder that is, contains or lies inside one of `inputs`.

    Returns:
        The absolute folder path, existing and marked as ours.
    """
    out = Path(os.path.abspath(os.fspath(path)))
    for inp in inputs:
        if inp is None:
            continue
        inp_path = Path(os.path.abspath(os.fspath(inp)))
        if _same_or_inside(out, inp_path) or _same_or_inside(inp_path, out):
            raise OutputDirError(f"{what}: {out} is or overlaps the input {inp_path}; choose another output folder")
    if _same_or_inside(Path.cwd().resolve(), out.resolve() if out.exists() else out):
        raise OutputDirError(f"{what}: {out} is the working directory (or holds it); choose a new folder")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{what}: {out} exists and is not a directory")
    if out.is_dir():
        entries = set(os.listdir(out)) - _OWN_FILES
        if entries and not is_our_output(out):
            raise OutputDirError(
                f"{what}: {out} is not empty and was not written by h3fusion; refusing to write into it "
                "(choose a new or empty folder)"
            )
        if entries and not (overwrite or resume):
            raise OutputDirError(f"{what}: {out} holds a previous h3fusion output; pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what}: cannot create {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise OutputDirError(f"{what}: {out} is not writable")
    mark_output_dir(out, kind)
    return out


def clear_our_output(path: str | os.PathLike, keep: Iterable[str] = ()) -> None:
    """Empty a folder that carries our marker (keeping the marker, the lock and `keep`); refuses any other folder."""
    out = Path(path)
    if not is_our_output(out):
        raise OutputDirError(f"{out} was not written by h3fusion; refusing to empty it")
    spared = _OWN_FILES | set(keep)
    for entry in os.listdir(out):
        if entry in spared:
            continue
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


# ---- run locks -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `path` for the `with` block's lifetime.

    The lock is an OS file lock (`fcntl.flock`) on `path/.h3fusion.lock`, released by the OS when the process
    dies, so a crashed run never leaves a stale lock. The file records the holder (pid, host, command).

    Raises:
        OutputDirError: another process holds the lock; the message names it.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise OutputDirError(f"{folder} is in use by another run ({holder}); wait for it or pick another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing releases the flock
