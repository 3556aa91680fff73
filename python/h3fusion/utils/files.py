"""The one home of the project's file-safety contract: atomic writes, output folders we may own, and run locks.

Rules every subcommand and API that writes follows:
  * a file is written under a temporary name in its own folder and renamed into place (`atomic_write_*`), so a
    crash never leaves a truncated file under the final name;
  * a whole folder (a checkpoint, a saved model) is written into a staging folder and swapped into place
    (`make_staging_dir`, `atomic_replace_dir`);
  * an output folder is ours to write only when it is new, empty, or carries our marker file (`OUTPUT_MARKER`,
    written when we create it), and a previous output of ours is replaced only when asked (--overwrite); a folder
    of the user's, the working directory, or an input of the same run is never replaced or emptied
    (`check_output_dir` before any work starts, `prepare_output_dir` / `claim_output_dir` when the run starts);
  * a long run holds an exclusive lock on its output folder (`output_lock`, taken by `claim_output_dir`), so two
    runs never interleave their checkpoints; the second fails at once naming the holder;
  * JSON is standard JSON (`atomic_write_json`: NaN/inf become null) and a JSON input that cannot be read is
    reported with its file name (`read_json`).
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
    "atomic_replace_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "claim_output_dir",
    "clear_our_output",
    "is_main_process",
    "is_our_output",
    "make_staging_dir",
    "mark_output_dir",
    "output_lock",
    "prepare_output_dir",
    "read_json",
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


def check_output_file(path: str | os.PathLike, what: str = "--out", inputs: Iterable[Any] = ()) -> Path:
    """Validate a file we will write later, before any work starts: not a folder, not an input of the run; its parent
    exists or can be made, and is writable.

    Raises:
        OutputDirError: naming `what`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{what}: {path} is a directory; expected a file path")
    for inp in _paths(inputs):
        if _real(path) == inp:
            raise OutputDirError(f"{what}: {path} is an input of this run; choose another output file")
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


def read_json(path: str | os.PathLike, what: str | None = None) -> Any:
    """Parse a JSON file; every failure is a `ValueError` naming the file (and `what`, e.g. "--prototype-prompts").

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: not UTF-8, not valid JSON (with line and column), or a folder.
    """
    path = Path(path)
    label = f"{what}: {path}" if what else str(path)
    if path.is_dir():
        raise ValueError(f"{label} is a directory; expected a JSON file")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{label} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label} is not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


# ---- output folders ----------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _paths(items: Iterable[Any]) -> list[Path]:
    # inputs may hold None or non-path specs (in-memory models): only paths can collide with an output
    return [_real(p) for p in items if isinstance(p, (str, os.PathLike))]


def is_main_process() -> bool:
    """False on the non-zero ranks of a torch.distributed / accelerate launch (RANK set and not 0)."""
    return os.environ.get("RANK", "0") in ("", "0")


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder we wrote (it carries `OUTPUT_MARKER`)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def mark_output_dir(path: str | os.PathLike, kind: str) -> None:
    """Put our marker into a folder we own (`kind` names the subcommand that wrote it)."""
    marker = {"tool": "h3fusion", "kind": kind}
    atomic_write_text(Path(path) / OUTPUT_MARKER, json.dumps(marker) + "\n")


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[Any] = (),
    what: str = "--out",
) -> Path:
    """Validate an output folder before any work starts; creates nothing.

    Allowed: a path that does not exist (its nearest existing ancestor must be a writable folder), an empty folder,
    or a previous output of ours (marker file present) when `overwrite` (its contents will be replaced) or `resume`
    (the run continues in it). Refused with `OutputDirError` naming `what`: a file, a non-empty folder without our
    marker, a previous output without `overwrite`/`resume`, the working directory or one of its parents, and any
    folder that is, holds or lies inside one of `inputs` (paths; other values are ignored).

    Returns:
        The absolute folder path.
    """
    out = Path(os.path.abspath(os.fspath(path)))
    if not is_main_process():
        # the main process checks and owns the folder (its failure ends the launch); another rank looking now would
        # race with the main process creating it (a marker half-written looks like a stranger's file)
        return out
    real = _real(out)
    if _same_or_inside(_real(Path.cwd()), real):
        raise OutputDirError(f"{what}: {out} is the working directory (or holds it); choose a new folder")
    for inp in _paths(inputs):
        if _same_or_inside(real, inp) or _same_or_inside(inp, real):
            raise OutputDirError(f"{what}: {out} is or overlaps the input {inp}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{what}: {out} exists and is not a directory")
    if out.is_dir():
        holder = _lock_holder(out)
        if holder is not None:
            raise OutputDirError(f"{what}: {out} is in use by another run ({holder}); wait for it or pick another")
        entries = set(os.listdir(out)) - _OWN_FILES
        if entries and not is_our_output(out):
            raise OutputDirError(
                f"{what}: {out} is not empty and was not written by h3fusion; refusing to write into it "
                "(choose a new or empty folder)"
            )
        if entries and not (overwrite or resume):
            raise OutputDirError(f"{what}: {out} holds a previous h3fusion output; pass --overwrite to replace it")
        if not os.access(out, os.W_OK):
            raise OutputDirError(f"{what}: {out} is not writable")
    else:
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputDirError(f"{what}: cannot create {out}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK):
            raise OutputDirError(f"{what}: cannot create {out}: {ancestor} is not writable")
    return out


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[Any] = (),
    what: str = "--out",
) -> Path:
    """`check_output_dir`, then create the folder (with the umask's normal permissions) and mark it as ours.

    Returns:
        The absolute folder path, existing and marked as ours.
    """
    out = check_output_dir(path, overwrite=overwrite, resume=resume, inputs=inputs, what=what)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what}: cannot create {out}: {exc.strerror}") from None
    mark_output_dir(out, kind)
    return out


@contextlib.contextmanager
def claim_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[Any] = (),
    what: str = "--out",
    lock: bool = True,
    clear: bool = True,
) -> Iterator[Path]:
    """A run's output folder for the `with` block: checked, created, marked, locked and, with `overwrite`, emptied.

    On the main process (`is_main_process`): `output_lock` for the block's lifetime (unless `lock=False`), then
    `prepare_output_dir`, then `clear_our_output` when `overwrite` and `clear` and not `resume` (pass clear=False when
    the run replaces the folder's contents itself at the end, e.g. by `atomic_replace_dir`). On other ranks of a
    distributed launch only `check_output_dir` (the main process owns the folder). If the block fails and the folder
    did not exist before, it is removed again when it holds nothing but our marker and lock (no empty folder left).

    Raises:
        OutputDirError: as `check_output_dir`, or another run holds the lock.
    """
    inputs = list(inputs)
    if not is_main_process():
        yield check_output_dir(path, overwrite=overwrite, resume=resume, inputs=inputs, what=what)
        return
    out = check_output_dir(path, overwrite=overwrite, resume=resume, inputs=inputs, what=what)
    created = not out.exists()
    try:
        with output_lock(out) if lock else contextlib.nullcontext(out):
            prepare_output_dir(out, kind=kind, overwrite=overwrite, resume=resume, inputs=inputs, what=what)
            if overwrite and clear and not resume:
                clear_our_output(out)
            yield out
    except BaseException:
        if created and out.is_dir() and not set(os.listdir(out)) - _OWN_FILES:
            shutil.rmtree(out, ignore_errors=True)
        raise


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


def make_staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden folder `<parent>/.<name>.<random>.tmp` with normal permissions (mkdtemp's are 0700)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the fully written folder `staged` to `final` by rename (atomic on one filesystem); returns `final`.

    An existing `final` is first renamed aside and removed after the swap, so at every instant a complete folder
    exists under `final` or under the aside name. Callers decide whether `final` may be replaced (see
    `check_output_dir`); this function only makes the swap safe.
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        raise FileNotFoundError(f"staged folder {staged} does not exist")
    aside = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
    return final


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Write a whole output folder at once: yields a fresh staging folder next to `out` (`make_staging_dir`).

    On a clean exit the folder is marked as our output (`mark_output_dir`, when `kind` is given) and renamed into
    place (`atomic_replace_dir`); on any exception it is removed and `out` is left as it was. Callers check first
    whether `out` may be replaced (`check_output_dir`).
    """
    out = Path(out)
    tmp = make_staging_dir(out.parent, out.name)
    try:
        yield tmp
        if kind is not None:
            mark_output_dir(tmp, kind)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    # make a rename durable; not every platform can open a directory
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- run locks -----------------------------------------------------------------------------------------------------

# folders whose lock this process holds (a probe from the holder itself must not see its own lock as a stranger's)
_HELD: set[Path] = set()


def _lock_holder(folder: Path) -> str | None:
    """Who holds the run lock of `folder` (a description), or None when nobody else does. Takes no lock."""
    lock_path = folder / LOCK_FILE
    if sys.platform == "win32" or _real(folder) in _HELD or not lock_path.is_file():
        return None
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


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
                raise OutputDirError(
                    f"{folder} is in use by another run ({holder}); wait for it or pick another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        _HELD.add(_real(folder))
        try:
            yield folder
        finally:
            _HELD.discard(_real(folder))
    finally:
        os.close(fd)  # closing releases the flock
