"""`h3fusion fuserl`: sample -> score -> build -> FuseSFT -> FusePO [-> eval] -> report, in one resumable run.

Each stage writes into its own folder of the run folder and records there, in `stage.json`, the hash of its inputs
and settings (the upstream stage's hash, fingerprints of the model folders and the prompts file, the stage's config
section without execution-only keys such as batch sizes and the device) and its status:
  * complete with the same hash -> skipped;
  * unfinished with the same hash -> resumed (sampling and scoring continue from their append-only files, the
    training stages from their latest checkpoint when their section sets save_steps; build runs again);
  * another hash -> its folder is emptied and it runs again; since every hash includes the upstream one, the stages
    after it rerun too, and the stages before it are untouched.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_json, clear_our_output, output_lock, prepare_output_dir
from .config import PipelineConfig, trainer_namespace
from .records import dir_fingerprint, file_sha256, settings_hash

__all__ = ["STAGES", "run_pipeline"]

STAGES = ("sample", "score", "build", "fuse_sft", "fuse_po", "eval")


class _Run:
    """State shared by the stages of one pipeline invocation."""

    def __init__(self, cfg: PipelineConfig, out: Path, progress: Callable[[str], None] | None):
        self.cfg, self.out, self.log = cfg, out, progress or (lambda msg: None)
        self.hashes: dict[str, str] = {}
        self.report_stages: list[dict[str, Any]] = []
        self.summaries: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}
        self.device = cfg.device

    def fingerprint(self, folder: str) -> str:
        if folder not in self._fingerprints:
            self._fingerprints[folder] = dir_fingerprint(folder)
        return self._fingerprints[folder]

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def run_stage(self, name: str, identity: dict[str, Any], body: Callable[[Path, bool], dict[str, Any]]) -> None:
        """Skip, resume or (re)run one stage; `body(folder, resuming)` returns the stage summary."""
        h = settings_hash({"stage": name, **identity})
        self.hashes[name] = h
        folder = self.dir(name)
        state_path = folder / "stage.json"
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else None
        if state and state.get("hash") == h and state.get("status") == "complete":
            self.log(f"[fuserl] {name}: complete for these inputs and settings, skipped")
            self.summaries[name] = state.get("summary", {})
            self.report_stages.append(
                {"name": name, "status": "skipped", "seconds": 0.0, "ran_seconds": state.get("seconds"), "hash": h}
            )
            return
        resuming = bool(state and state.get("hash") == h)
        prepare_output_dir(folder, kind=f"fuserl-{name}", resume=True, what=f"stage folder {name}")
        if state and not resuming:
            self.log(f"[fuserl] {name}: inputs or settings changed, running it again")
            clear_our_output(folder)
        else:
            self.log(f"[fuserl] {name}: {'resuming' if resuming else 'running'}")
        started = time.time()
        record = {"stage": name, "hash": h, "identity": identity, "status": "running", "started": started}
        atomic_write_json(state_path, record)
        summary = body(folder, resuming)
        seconds = time.time() - started
        atomic_write_json(state_path, {**record, "status": "complete", "seconds": seconds, "summary": summary})
        self.summaries[name] = summary
        self.report_stages.append(
            {"name": name, "status": "resumed" if resuming else "ran", "seconds": seconds, "hash": h}
        )


def _exec_only(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _train(run: _Run, stage: str, model: str, data: Path, folder: Path, fixed: dict[str, Any]) -> dict[str, Any]:
    from ..cli import fuse_po, fuse_sft

    cfg = run.cfg
    section = cfg.fuse_sft if stage == "fuse_sft" else cfg.fuse_po
    # the target is sampled and trained through its chat template unless the config says otherwise
    section = {"chat_template": True, **section}
    # the trainer gets a folder of its own inside the stage folder (which holds stage.json)
    out = folder / "train"
    # an interrupted stage (same settings) continues its training from the latest checkpoint (set save_steps in the
    # stage's section to get checkpoints); a stage whose settings changed was cleared before this point
    values = {"model": model, "data": str(data), "out": str(out), "resume": out.is_dir(), **fixed}
    args = trainer_namespace(stage, section, values, where=str(cfg.path), device=run.device)
    try:
        (fuse_sft if stage == "fuse_sft" else fuse_po).run(args)
    except SystemExit as exc:  # the CLIs stop with a message (e.g. no pairs survive the gap window)
        if isinstance(exc.code, str):
            raise ValueError(f"{stage}: {exc.code}") from None
        raise
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    return {k: v for k, v in log.items() if k != "log_history"}


def run_pipeline(
    cfg: PipelineConfig,
    *,
    progress: Callable[[str], None] | None = None,
    on_sample: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline of `cfg` in `cfg.out` and write its report.

    Args:
        cfg: a validated config (`h3fusion.fuserl.config.load_config`).
        progress: called with one line per stage event.
        on_sample: sampling progress callback (source, prompts done, prompts total).

    Returns:
        the report dict (also `<out>/report.json`, with `report.md` and the figures beside it).
    """
    from ..cli.common import resolve_device
    from .build import build_data, load_scored_records
    from .report import plot_reward_histogram, plot_training_curves, write_report
    from .sampling import sample_to_file
    from .scoring import score_file

    inputs = [cfg.prompts, *cfg.sources.values(), cfg.target, cfg.score["reward_model"]]
    out = prepare_output_dir(cfg.out, kind="fuserl", resume=True, inputs=inputs, what="out")
    device = cfg.device or resolve_device(argparse.Namespace(device=None))
    run = _Run(cfg, out, progress)
    run.device = device
    with output_lock(out):
        t0 = time.time()
        samples = run.dir("sample") / "samples.jsonl"
        sample_id = {
            "prompts": file_sha256(cfg.prompts),
            "sources": {n: run.fingerprint(d) for n, d in cfg.sources.items()},
            "generation": cfg.sample.identity(),
        }
        run.run_stage(
            "sample",
            sample_id,
            lambda folder, _: sample_to_file(
                cfg.sources, cfg.prompts, samples, cfg.sample, device=device, progress=on_sample
            ),
        )

        scored = run.dir("score") / "scored.jsonl"
        score_settings = {k: v for k, v in cfg.score.items() if k != "reward_model"}
        score_id = {
            "upstream": run.hashes["sample"],
            "reward_model": run.fingerprint(cfg.score["reward_model"]),
            "settings": _exec_only(score_settings, "batch_size"),
        }
        run.run_stage(
            "score",
            score_id,
            lambda folder, _: score_file(cfg.score["reward_model"], samples, scored, device=device, **score_settings),
        )

        build_dir = run.dir("build")
        build_id = {"upstream": run.hashes["score"], "settings": asdict(cfg.build)}
        run.run_stage("build", build_id, lambda folder, _: build_data(load_scored_records(scored), folder, cfg.build))

        model = cfg.target
        upstream = {"build": run.hashes["build"], "target": run.fingerprint(cfg.target)}
        if cfg.fuse_sft is not None:
            fixed = {"top_k": cfg.build.top_k, "temperature": cfg.build.sft_temperature}
            run.run_stage(
                "fuse_sft",
                {**upstream, "section": cfg.fuse_sft},
                lambda folder, _: _train(run, "fuse_sft", cfg.target, build_dir / "sft_records.jsonl", folder, fixed),
            )
            model = str(run.dir("fuse_sft") / "train" / "model")
            upstream = {"build": run.hashes["build"], "sft": run.hashes["fuse_sft"]}
        if cfg.fuse_po is not None:
            b = cfg.build
            fixed = {
                "gap_min": b.gap_min,
                "gap_max": b.gap_max,
                "temperature": b.temperature,
                "target_source": b.target_source,
            }
            if b.mode == "rloo":
                fixed["rloo_temperature"] = b.rloo_temperature
            else:
                fixed["pair_mode"] = b.mode
            start = model
            run.run_stage(
                "fuse_po",
                {**upstream, "section": cfg.fuse_po},
                lambda folder, _: _train(run, "fuse_po", start, build_dir / "po_records.jsonl", folder, fixed),
            )
            model = str(run.dir("fuse_po") / "train" / "model")
            upstream = {"po": run.hashes["fuse_po"]}
        eval_note = None
        if cfg.eval is not None:
            if importlib.util.find_spec("h3fusion.evaluation") is None:
                eval_note = "eval configured but h3fusion.evaluation is not installed; skipped"
                run.log(f"[fuserl] {eval_note}")
            else:
                run.run_stage(
                    "eval", {**upstream, "section": cfg.eval}, lambda folder, _: _evaluate(cfg, model, device, folder)
                )
        report = _report(
            run, scored, time.time() - t0, model, eval_note, plot_reward_histogram, plot_training_curves, write_report
        )
    return report


def _evaluate(cfg: PipelineConfig, model: str, device: str, folder: Path) -> dict[str, Any]:
    """`h3fusion eval --model target=TARGET --model fuserl=MODEL <eval flags> --out FOLDER/eval`: the trained model
    next to the model it started from. Returns eval's results.json (model name -> metrics)."""
    from ..cli import main

    section = dict(cfg.eval)
    argv = ["eval"]
    if section.pop("compare_target", True):
        argv += ["--model", f"target={cfg.target}"]
    argv += ["--model", f"fuserl={model}"]
    section.setdefault("device", device)
    base = cfg.path.resolve().parent
    for key, value in section.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            value = str(base / value)  # a file named relative to the config, like the config's other paths
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    out = folder / "eval"
    if main([*argv, "--out", str(out)]) != 0:
        raise RuntimeError(f"h3fusion eval failed: {' '.join(argv)}")
    results = out / "results.json"
    return json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}


def _report(
    run: _Run,
    scored: Path,
    seconds: float,
    model: str,
    eval_note: str | None,
    plot_reward_histogram,
    plot_training_curves,
    write_report,
) -> dict[str, Any]:
    figures: dict[str, str] = {}
    records = [json.loads(line) for line in scored.read_text(encoding="utf-8").splitlines() if line.strip()]
    plot_reward_histogram(records, run.out / "rewards.png", title="rewards per source")
    figures["rewards"] = "rewards.png"
    logs = {}
    for stage in ("fuse_sft", "fuse_po"):
        log_file = run.dir(stage) / "train" / "train_log.json"
        if stage in run.summaries and log_file.is_file():
            logs[stage] = json.loads(log_file.read_text(encoding="utf-8")).get("log_history", [])
    if plot_training_curves(logs, run.out / "training_curves.png") is not None:
        figures["training curves"] = "training_curves.png"
    report = {
        "config": str(run.cfg.path),
        "run": str(run.out),
        "final_model": model,
        "seconds": seconds,
        "stages": run.report_stages,
        "data": {k: run.summaries[k] for k in ("sample", "score", "build") if k in run.summaries},
        "training": {k: run.summaries[k] for k in ("fuse_sft", "fuse_po") if k in run.summaries},
        "eval": run.summaries.get("eval") or ({"note": eval_note} if eval_note else None),
        "figures": figures,
    }
    write_report(run.out, report)
    return report
