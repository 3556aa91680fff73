"""Atomic checkpoint directories and their validation before a resume.

A checkpoint is written into a hidden staging folder and renamed into place (`h3fusion.utils.files.
atomic_replace_dir`). A run interrupted mid-write leaves only the staging folder (ignored by
`transformers.trainer_utils.get_last_checkpoint`, whose pattern is `^checkpoint-\\d+$`), so the previous checkpoint
stays the latest complete one. `check_checkpoint_dir` reads every file a resume will read, so a corrupted checkpoint
is reported with its file name before training starts rather than as a raw parser error deep inside the Trainer.
"""

from __future__ import annotations

import os
import shutil

from h3fusion.utils.files import atomic_replace_dir, read_json

__all__ = ["STAGING_PREFIX", "check_checkpoint_dir", "clean_stale_staging", "publish_staged_dir", "staging_dir_for"]

STAGING_PREFIX = ".staging-"
TRAINER_STATE = "trainer_state.json"


def staging_dir_for(run_dir: str, name: str) -> str:
    """The staging folder that holds `name` while it is written: `<run_dir>/.staging-<name>`."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{name}")


def publish_staged_dir(staged: str, final: str) -> None:
    """Moves a fully written folder `staged` to `final` with a rename (see `atomic_replace_dir`)."""
    atomic_replace_dir(staged, final)


def clean_stale_staging(run_dir: str) -> None:
    """Removes staging folders left by interrupted writes."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if entry.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def check_checkpoint_dir(path: str | os.PathLike, what: str = "--resume") -> None:
    """Validate a Trainer checkpoint before resuming from it: the folder exists, `trainer_state.json` is a JSON
    object, every other JSON file parses, and every safetensors file has a readable header whose tensors fit in the
    file. (The optimizer / RNG `.pt` files are left to torch: reading them here would cost as much as the resume.)

    Raises:
        ValueError: naming `what` and the file that is missing or corrupted.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{what}: the checkpoint folder {path} does not exist")
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{what}: {path} is not a Trainer checkpoint (it has no {TRAINER_STATE})")
    state = read_json(state_file, what)
    if not isinstance(state, dict) or not isinstance(state.get("global_step", 0), int):
        raise ValueError(f"{what}: {state_file} is not a trainer state (expected an object with global_step)")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            check_safetensors_file(os.path.join(path, name), what)
        elif name.endswith(".json") and name != TRAINER_STATE:
            read_json(os.path.join(path, name), what)  # config.json, the shard index, ...


def check_safetensors_file(file: str | os.PathLike, what: str | None = None) -> None:
    """Open a safetensors file's header (cheap: no tensor is read) and check that the data it promises is there.

    Raises:
        ValueError: naming the file, when the header cannot be parsed or the file is shorter than the header says.
    """
    from safetensors import safe_open

    label = f"{what}: {os.fspath(file)}" if what else os.fspath(file)
    try:
        with safe_open(os.fspath(file), framework="pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError, ... all mean the same to the user
        raise ValueError(f"{label} is not a readable safetensors file ({exc})") from None
