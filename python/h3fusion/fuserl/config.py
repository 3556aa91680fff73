"""The `h3fusion fuserl` pipeline configuration: reading, validation, and the trainers' argument namespaces.

A config is a YAML file (JSON also works: it is YAML, and it is read with the json module when PyYAML is absent):

    out: runs/fuserl              # the run folder (or --out)
    prompts: prompts.jsonl
    sources: {qwen: models/qwen, llama: models/llama, target: models/target}
    target: models/target         # the model FuseSFT then FusePO train
    device: cuda                  # optional (sampling / scoring device; "cpu" also makes the trainers use the CPU)
    sample: {n: 5, temperature: 0.8, top_p: 0.95, max_new_tokens: 512, ...}        (`SampleSettings` fields)
    score: {reward_model: models/rm, batch_size: 8, reward_index: null, trust_remote_code: false, ...}
    build: {sft_ratio: 0.4, top_k: 3, mode: per_source, gap_min: 0.01, gap_max: 0.1, ...}  (`BuildSettings`)
    fuse_sft: {max_steps: 100, lr: 1e-6, ...}   # `h3fusion fuse-sft` flags, underscored; false skips the stage
    fuse_po: {loss: dpo, beta: 0.1, ...}        # `h3fusion fuse-po` flags, underscored; false skips the stage
    eval: {suite: honest, ...}                  # optional `h3fusion eval` flags, used when h3fusion.evaluation exists

Relative paths are relative to the config file's folder. The pair-building settings live only under `build:` and
are handed to the trainers, so the data the report counts is the data they train on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .build import BuildSettings
from .records import validate_source_name
from .sampling import SampleSettings

__all__ = ["PipelineConfig", "load_config", "trainer_namespace"]

_TOP = {"out", "prompts", "sources", "target", "device", "sample", "score", "build", "fuse_sft", "fuse_po", "eval"}
_SCORE_KEYS = {"reward_model", "batch_size", "reward_index", "trust_remote_code", "dtype", "max_length"}
# trainer flags that the pipeline sets itself (the model chain, the data, the output, the pair building)
_SFT_FIXED = {"model", "data", "out", "top_k", "temperature", "cpu", "device", "overwrite", "resume"}
_PO_FIXED = {
    "model",
    "data",
    "out",
    "pair_mode",
    "gap_min",
    "gap_max",
    "temperature",
    "target_source",
    "rloo_temperature",
    "cpu",
    "device",
    "overwrite",
    "resume",
}


@dataclass
class PipelineConfig:
    """A validated pipeline config (paths absolute)."""

    path: Path
    out: Path
    prompts: Path
    sources: dict[str, str]
    target: str
    device: str | None
    sample: SampleSettings
    score: dict[str, Any]
    build: BuildSettings
    fuse_sft: dict[str, Any] | None
    fuse_po: dict[str, Any] | None
    eval: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        import yaml
    except ModuleNotFoundError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            msg = "PyYAML is not installed, so the config must be JSON (or pip install pyyaml)"
            raise ValueError(f"{path}: {msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from None


def _dataclass_from(cls: type, section: Any, where: str) -> Any:
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = dict(section)
    if values.get("gap_max") in ("inf", ".inf"):
        values["gap_max"] = math.inf
    obj = cls(**values)
    try:
        obj.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return obj


def load_config(path: str | os.PathLike, out: str | None = None, device: str | None = None) -> PipelineConfig:
    """Read and validate a pipeline config; errors name the config file and the key.

    Args:
        path: the YAML/JSON file.
        out: the run folder (overrides the config's `out`).
        device: overrides the config's `device`.
    """
    path = Path(path)
    raw = _read(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(_TOP)}")
    base = path.resolve().parent

    def p(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: '{key}' must be a path")
        return str((base / value).resolve()) if not os.path.isabs(value) else value

    for key in ("prompts", "sources", "target", "score"):
        if key not in raw:
            raise ValueError(f"{path}: missing '{key}'")
    sources = raw["sources"]
    if not isinstance(sources, dict) or not sources:
        raise ValueError(f"{path}: 'sources' must map source names to model folders")
    for name in sources:
        validate_source_name(name)
    score = raw["score"]
    if not isinstance(score, dict) or "reward_model" not in score:
        raise ValueError(f"{path}: 'score' must be a mapping with 'reward_model'")
    bad = sorted(set(score) - _SCORE_KEYS)
    if bad:
        raise ValueError(f"{path}: score: unknown key(s) {bad}; known: {sorted(_SCORE_KEYS)}")
    score = {**score, "reward_model": p(score["reward_model"], "score.reward_model")}
    fuse_sft, fuse_po = raw.get("fuse_sft", {}), raw.get("fuse_po", {})
    for key, section in (("fuse_sft", fuse_sft), ("fuse_po", fuse_po)):
        if section is not False and section is not None and not isinstance(section, dict):
            raise ValueError(f"{path}: '{key}' must be a mapping of flags, or false to skip the stage")
    fuse_sft = None if fuse_sft is False else dict(fuse_sft or {})
    fuse_po = None if fuse_po is False else dict(fuse_po or {})
    build_raw = dict(raw.get("build") or {})
    loss = (fuse_po or {}).get("loss", "dpo")
    default_mode = {"rloo": "rloo", "wrpo": "wrpo"}.get(loss, "per_source")
    build_raw.setdefault("mode", default_mode)
    if fuse_po is not None and (loss == "rloo") != (build_raw["mode"] == "rloo"):
        raise ValueError(
            f"{path}: build.mode {build_raw['mode']!r} does not fit fuse_po.loss {loss!r} (loss rloo <-> mode rloo)"
        )
    if fuse_po is not None and loss == "wrpo" and not build_raw.get("target_source"):
        raise ValueError(f"{path}: fuse_po.loss 'wrpo' needs build.target_source (the target model's source name)")
    ratio = build_raw.get("sft_ratio", BuildSettings.sft_ratio)
    if fuse_sft is not None and ratio == 0:
        raise ValueError(f"{path}: build.sft_ratio is 0: no prompts for FuseSFT; set fuse_sft: false to skip it")
    if fuse_po is not None and ratio == 1:
        raise ValueError(f"{path}: build.sft_ratio is 1: no prompts for FusePO; set fuse_po: false to skip it")
    ev = raw.get("eval")
    if ev is not None and not isinstance(ev, dict):
        raise ValueError(f"{path}: 'eval' must be a mapping of `h3fusion eval` flags")
    out_dir = out if out is not None else raw.get("out")
    if out_dir is None:
        raise ValueError(f"{path}: no run folder: set 'out' in the config or pass --out")
    cfg = PipelineConfig(
        path=path,
        out=Path(p(out_dir, "out") if out is None else os.path.abspath(out_dir)),
        prompts=Path(p(raw["prompts"], "prompts")),
        sources={n: p(d, f"sources.{n}") for n, d in sources.items()},
        target=p(raw["target"], "target"),
        device=device if device is not None else raw.get("device"),
        sample=_dataclass_from(SampleSettings, raw.get("sample"), f"{path}: sample"),
        score=score,
        build=_dataclass_from(BuildSettings, build_raw, f"{path}: build"),
        fuse_sft=fuse_sft,
        fuse_po=fuse_po,
        eval=ev,
        raw=raw,
    )
    if fuse_sft is not None:
        trainer_namespace("fuse_sft", fuse_sft, {"model": cfg.target, "data": "x", "out": "x"}, where=str(path))
    if fuse_po is not None:
        trainer_namespace("fuse_po", fuse_po, {"model": cfg.target, "data": "x", "out": "x"}, where=str(path))
    return cfg


class _ConfigParser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of printing usage and exiting
        raise ValueError(message)


def _flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def trainer_namespace(
    stage: str, section: dict[str, Any], fixed: dict[str, Any], where: str = "config", device: str | None = None
):
    """The argparse namespace of `h3fusion fuse-sft` / `fuse-po` for a config section plus the pipeline's values.

    Every value goes through the subcommand's own parser, so types, choices and defaults are exactly the CLI's.

    Args:
        stage: "fuse_sft" or "fuse_po".
        section: the config section (flag names with underscores -> values; true/false for switches).
        fixed: values the pipeline sets (model, data, out, pair building); the section may not set them.
        where: the config file, for error messages.
        device: the pipeline's device, passed as the trainer's `--device` (cpu / cuda) or `--cpu`, whichever flag
            the subcommand has; the trainer's `--overwrite` (when it has one) is set, as the pipeline owns the folder.
    """
    from ..cli import fuse_po, fuse_sft

    module = fuse_sft if stage == "fuse_sft" else fuse_po
    reserved = _SFT_FIXED if stage == "fuse_sft" else _PO_FIXED
    parser = _ConfigParser(prog=f"{stage}", add_help=False)
    module.add_arguments(parser)
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:  # per destination, the flag named after it (not a deprecated alias sharing its dest)
        if a.option_strings and (a.dest not in actions or _flag_of(a.dest) in a.option_strings):
            actions[a.dest] = a
    fixed = dict(fixed)
    if "overwrite" in actions and not fixed.get("resume"):
        fixed["overwrite"] = True
    if device is not None and "device" in actions:
        fixed["device"] = "cpu" if device == "cpu" else "cuda"
    elif device == "cpu" and "cpu" in actions:
        fixed["cpu"] = True
    argv: list[str] = []
    for key, value in {**section, **fixed}.items():
        if key in section and key in reserved:
            hint = (
                "under build:"
                if key not in ("model", "data", "out", "cpu", "device", "overwrite", "resume")
                else "by the pipeline"
            )
            raise ValueError(f"{where}: {stage}.{key} is set {hint}; remove it from {stage}")
        action = actions.get(key)
        if action is None:
            raise ValueError(
                f"{where}: {stage}.{key} is not a flag of h3fusion {stage.replace('_', '-')}; "
                f"known: {sorted(set(actions) - reserved)}"
            )
        flag = _flag_of(key) if _flag_of(key) in action.option_strings else action.option_strings[-1]
        if action.nargs == 0:  # a switch (store_true and the like)
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {stage}.{key} must be true or false")
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    try:
        return parser.parse_args(argv)
    except ValueError as exc:
        raise ValueError(f"{where}: {stage}: {exc}") from None
