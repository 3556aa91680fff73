"""Stage 2 of an evaluation: every judge, loaded once, scores every model's generations (and the helpful
references once); each verdict is appended to `OUT/<model>.<stage>.jsonl`, so a rerun judges only what is left."""

from __future__ import annotations

import gc

from .samples import RunFolder, SampleLog

__all__ = ["free_memory", "run_judges"]


def free_memory() -> None:
    """Give a dropped model's GPU memory back before the next one loads (a full gc costs ~1 s: GPU only)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_judges(run: RunFolder, names, data, judges, device, dtype, batch_size, unsafe_label, moderation_template):
    """Judge every model's stored generations with each given judge (one judge in memory at a time).

    Args:
        run: the output folder.
        names: the models, in order.
        data: the loaded datasets (keys truthfulqa / harmful / helpful, as the runner builds them).
        judges: {"truth", "info", "moderation", "reward", "pairwise"} -> folder, (model, tokenizer) or None.
        device, dtype: where and how judges are loaded.
        batch_size: samples per judge call.
        unsafe_label, moderation_template: moderation-classifier options (see `load_moderation`).
    """
    from .judges import BEAVERTAILS_TEMPLATE, PairwiseJudge, RewardModel, YesNoJudge, load_judge_parts, load_moderation

    by_id = {k: {it["id"]: it for it in data[k]} for k in ("truthfulqa", "harmful", "helpful") if k in data}
    source = {"truthfulqa_gen": "truthfulqa", "harmless_gen": "harmful", "helpful_gen": "helpful"}

    def each_model(stage_in: str, stage_out: str):
        """(log_out, generations to judge) per model: those of the current data (a rerun may have a smaller
        --limit than the run that generated them) not judged yet."""
        wanted = by_id[source[stage_in]]
        for name in names:
            log_out = run.log(name, stage_out)
            gens = run.log(name, stage_in)
            todo = [g for g in gens.done.values() if g["id"] in wanted and g["id"] not in log_out.done]
            todo.sort(key=lambda g: g["id"])
            yield name, log_out, todo

    def pending(stage_in: str, stage_out: str) -> bool:
        return any(todo for _, _, todo in each_model(stage_in, stage_out))

    if data.get("truthfulqa_generation"):
        for kind, spec in (("truth", judges["truth"]), ("info", judges["info"])):
            stage = f"truthfulqa_{kind}"
            if spec is None or not pending("truthfulqa_gen", stage):
                continue
            model, tok = load_judge_parts(spec, f"--{kind}-judge", "causal", device, dtype)
            judge = YesNoJudge(model, tok, kind, batch_size=batch_size, what=f"--{kind}-judge")
            for name, log_out, todo in each_model("truthfulqa_gen", stage):
                run.say(f"[{name}] {kind} judge: {len(todo)} answers")
                for chunk in _batched(todo, batch_size):
                    qs = [by_id["truthfulqa"][g["id"]]["question"] for g in chunk]
                    scores = judge.score(qs, [g["response"] for g in chunk])
                    log_out.append({"id": g["id"], "p_yes": s} for g, s in zip(chunk, scores))
            del model, judge
            free_memory()

    if "harmful" in data and pending("harmless_gen", "harmless_judged"):
        mod = load_moderation(
            judges["moderation"],
            device,
            template=moderation_template or BEAVERTAILS_TEMPLATE,
            unsafe_label=unsafe_label,
            batch_size=batch_size,
            dtype=dtype,
        )
        for name, log_out, todo in each_model("harmless_gen", "harmless_judged"):
            run.say(f"[{name}] moderation: {len(todo)} responses")
            for chunk in _batched(todo, batch_size):
                prompts = [by_id["harmful"][g["id"]]["prompt"] for g in chunk]
                scores = mod.score(prompts, [g["response"] for g in chunk])
                log_out.append({"id": g["id"], **s} for g, s in zip(chunk, scores))
        del mod
        free_memory()

    if "helpful" in data and judges["reward"] is not None:
        ref_log = SampleLog(run.out / "reference.helpful_reward.jsonl")
        ref_todo = ref_log.missing(data["helpful"])
        if ref_todo or pending("helpful_gen", "helpful_reward"):
            model, tok = load_judge_parts(judges["reward"], "--reward-model", "classifier", device, dtype)
            rm = RewardModel(model, tok, batch_size=batch_size)
            for chunk in _batched(ref_todo, batch_size):
                rewards = rm.score([it["instruction"] for it in chunk], [it["reference"] for it in chunk])
                ref_log.append({"id": it["id"], "reward": r} for it, r in zip(chunk, rewards))
            for name, log_out, todo in each_model("helpful_gen", "helpful_reward"):
                run.say(f"[{name}] reward model: {len(todo)} responses")
                for chunk in _batched(todo, batch_size):
                    ins = [by_id["helpful"][g["id"]]["instruction"] for g in chunk]
                    rewards = rm.score(ins, [g["response"] for g in chunk])
                    log_out.append({"id": g["id"], "reward": r} for g, r in zip(chunk, rewards))
            del model, rm
            free_memory()

    if "helpful" in data and judges["pairwise"] is not None and pending("helpful_gen", "helpful_pairwise"):
        model, tok = load_judge_parts(judges["pairwise"], "--judge-model", "causal", device, dtype)
        pj = PairwiseJudge(model, tok, batch_size=batch_size)
        for name, log_out, todo in each_model("helpful_gen", "helpful_pairwise"):
            run.say(f"[{name}] pairwise judge: {len(todo)} responses")
            for chunk in _batched(todo, batch_size):
                items = [by_id["helpful"][g["id"]] for g in chunk]
                scores = pj.score(
                    [it["instruction"] for it in items],
                    [g["response"] for g in chunk],
                    [it["reference"] for it in items],
                )
                log_out.append({"id": g["id"], **s} for g, s in zip(chunk, scores))
        del model, pj
        free_memory()
