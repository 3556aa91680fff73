"""Atomic checkpoint directories: write everything into a hidden staging folder, then rename it into place.

A run interrupted mid-write leaves only the staging folder (ignored by `transformers.trainer_utils.
get_last_checkpoint`, whose pattern is `^checkpoint-\\d+$`), so the previous checkpoint stays the latest complete one.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["STAGING_PREFIX", "clean_stale_staging", "publish_staged_dir", "staging_dir_for"]

STAGING_PREFIX = ".staging-"


def staging_dir_for(run_dir: str, name: str) -> str:
    """The staging folder that holds `name` while it is written: `<run_dir>/.staging-<name>`."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{name}")


def publish_staged_dir(staged: str, final: str) -> None:
    """Moves a fully written folder `staged` to `final` with a rename (atomic on one filesystem).

    An existing `final` (a checkpoint re-saved at the same step) is first renamed aside and removed after the
    swap, so at every instant a complete checkpoint exists under `final` or under the aside name.
    """
    if not os.path.isdir(staged):
        raise FileNotFoundError(f"staged checkpoint {staged!r} does not exist")
    aside = None
    if os.path.exists(final):
        aside = f"{final}.old-{os.getpid()}"
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clean_stale_staging(run_dir: str) -> None:
    """Removes staging folders left by interrupted writes."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if entry.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    # make the rename itself durable; not every platform can open a directory
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
