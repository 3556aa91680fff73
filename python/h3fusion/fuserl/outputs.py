"""Resumable file outputs of `h3fusion sample` / `h3fusion score`: a final file that appears only when complete.

Layout for an output FILE:
    FILE             the result, written (or renamed into place) once every item is done
    FILE.meta.json   {kind, hash, settings, status: "complete", summary}, written right after FILE
    FILE.work/       our folder (marker file) while the run is unfinished: settings.json (the run's settings and
                     hash) and the append-only JSONL files; removed once FILE and its meta are written

Rules: a rerun with the same settings continues from FILE.work/; an unfinished run with other settings is never
mixed in (error naming the differing settings, or started over with `overwrite`); a FILE already complete for the
same settings is left as it is; a FILE of anyone else or of other settings is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..utils.files import OutputDirError, atomic_write_json, check_output_file, clear_our_output, prepare_output_dir
from .records import settings_hash

__all__ = ["ResumableOutput"]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested settings dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


class ResumableOutput:
    """The bookkeeping of one resumable output file (see the module docstring).

    Args:
        path: the final output file.
        kind: the subcommand writing it ("sample", "score"); recorded in the meta and the work folder's marker.
        settings: everything that determines the result (a JSON-able dict); its hash identifies the run.
        overwrite: replace a previous output / discard an unfinished run with other settings.
        inputs: input paths the work folder must not overlap.
    """

    def __init__(self, path: str | os.PathLike, kind: str, settings: dict, *, overwrite: bool = False, inputs=()):
        self.path = check_output_file(path)
        self.kind = kind
        self.settings = settings
        self.hash = settings_hash(settings)
        self.meta_path = Path(f"{self.path}.meta.json")
        self.work = Path(f"{self.path}.work")
        self.overwrite = overwrite
        self.inputs = tuple(inputs)

    def read_meta(self) -> dict | None:
        """The meta of the existing output, or None."""
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_complete(self) -> bool:
        """Whether the output file exists and is complete for these settings."""
        meta = self.read_meta()
        return (
            self.path.is_file()
            and meta is not None
            and meta.get("hash") == self.hash
            and (meta.get("status") == "complete")
        )

    def begin(self) -> Path | None:
        """Check the output and prepare the work folder.

        Returns:
            the work folder to continue in (it may hold a previous unfinished run of the same settings), or None
            when the output is already complete for these settings (nothing to do).

        Raises:
            OutputDirError: the output or an unfinished run belongs to other settings (without `overwrite`), or the
                output file is not ours.
        """
        settings_file = self.work / "settings.json"
        if self.work.exists() and settings_file.is_file():
            old = json.loads(settings_file.read_text(encoding="utf-8"))
            if old.get("hash") != self.hash:
                if not self.overwrite and self._has_progress():
                    changed = ", ".join(_diff(old.get("settings", {}), self.settings)) or "unknown"
                    raise OutputDirError(
                        f"{self.work} holds an unfinished {self.kind} run with other settings (changed: {changed}); "
                        "rerun with the same settings to resume it, or pass --overwrite to start over"
                    )
                clear_our_output(self.work)
        elif self.path.exists() and not self.overwrite:
            meta = self.read_meta()
            if meta is None:
                raise OutputDirError(
                    f"{self.path} exists and was not written by h3fusion {self.kind}; pass --overwrite"
                )
            if self.is_complete():
                return None
            changed = ", ".join(_diff(meta.get("settings", {}), self.settings)) or "unknown"
            raise OutputDirError(
                f"{self.path} was written with other settings (changed: {changed}); pass --overwrite to replace it"
            )
        elif self.overwrite and self.work.exists():
            clear_our_output(self.work)
        prepare_output_dir(self.work, kind=f"{self.kind}-work", resume=True, inputs=self.inputs, what="--out")
        atomic_write_json(settings_file, {"kind": self.kind, "hash": self.hash, "settings": self.settings})
        return self.work

    def _has_progress(self) -> bool:
        # an unfinished run that appended nothing (e.g. it failed while loading a model) has nothing to lose
        return any(p.suffix == ".jsonl" and p.stat().st_size > 0 for p in self.work.iterdir())

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the output (already in place at `path`) as complete and remove the work folder."""
        meta = {"kind": self.kind, "hash": self.hash, "settings": self.settings, "status": "complete"}
        atomic_write_json(self.meta_path, {**meta, "summary": summary})
        shutil.rmtree(self.work, ignore_errors=True)
