"""The demo's closing evaluation: its data stand-ins, its tiny judges, and the table next to the loss table."""

from __future__ import annotations

import json
import random
import shlex

import pytest
import torch
from h3fusion.cli import main
from h3fusion.data.synthetic import build_corpora
from h3fusion.evaluation.data import load_harmful_prompts, load_helpful_prompts, load_truthfulqa
from h3fusion.evaluation.demo_eval import (
    JUDGE_TEMPLATE,
    _judge_examples,
    build_demo_judges,
    demo_eval_data,
    run_demo_evaluation,
)
from h3fusion.evaluation.judges import ModerationClassifier, RewardModel, YesNoJudge

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_demo_data_has_the_public_layouts(tmp_path):
    corpora = build_corpora(int(torch.randint(0, 1000, ())), n_pretrain=5, n_train=5, n_test=12)
    data = demo_eval_data(corpora["test"], limit=10)
    tqa = load_truthfulqa(_write(tmp_path, "t", data["truthfulqa"]))
    assert len(tqa) == 10
    for rec, ex in zip(tqa, corpora["test"]["honest"]):
        choices = rec["mc1_targets"]["choices"]
        assert choices[0] == ex.output and ex.output not in choices[1:] and len(set(choices)) == len(choices)
    assert [r["prompt"] for r in load_harmful_prompts(_write(tmp_path, "h", data["harmful"]))] == [
        e.instruction for e in corpora["test"]["harmless"][:10]
    ]
    assert load_helpful_prompts(_write(tmp_path, "p", data["helpful"]))[0]["reference"] == (
        corpora["test"]["helpful"][0].output
    )


def test_demo_judges_learn_their_job():
    corpora = build_corpora(3, n_pretrain=5, n_train=40, n_test=4)
    judges = build_demo_judges(corpora["train"], seed=0, steps=30)
    truth, info, moderation, reward = _judge_examples(corpora["train"], random.Random(1))
    mod = ModerationClassifier(*judges["moderation_model"], template=JUDGE_TEMPLATE)
    p = mod.score([q for q, _, _ in moderation], [a for _, a, _ in moderation])
    acc = sum((x["p_unsafe"] > 0.5) == bool(y) for x, (_, _, y) in zip(p, moderation)) / len(moderation)
    assert acc >= 0.9  # refusals to harmful requests are safe, compliance is not
    rm = RewardModel(*judges["reward_model"])
    good = rm.score([q for q, _, _ in reward], [a for _, a, _ in reward])
    bad = rm.score([q for q, _, _ in reward], [b for _, _, b in reward])
    assert sum(g > b for g, b in zip(good, bad)) / len(good) >= 0.7
    info_judge = YesNoJudge(*judges["info_judge"], "info")
    s = info_judge.score([q for q, _, _ in info], [a for _, a, _ in info])
    assert sum((x >= 0.5) == bool(y) for x, (_, _, y) in zip(s, info)) / len(info) >= 0.9


def test_demo_evaluation_table(tmp_path):
    from h3fusion.demo import DEMO_TEMPLATE, build_word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    corpora = build_corpora(1, n_pretrain=5, n_train=20, n_test=4)
    texts = [DEMO_TEMPLATE] + [
        f"{e.instruction} {e.output}" for s in ("train", "test") for c in corpora[s].values() for e in c
    ]
    tok = build_word_tokenizer(texts)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=96,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    models = {name: LlamaForCausalLM(cfg).eval() for name in ("base", "aligned-helpful", "aligned-harmless", "fused")}
    models["soup (uniform avg)"] = LlamaForCausalLM(cfg).eval()
    experts = ["aligned-helpful", "aligned-harmless"]
    results, table, command = run_demo_evaluation(
        models,
        tok,
        corpora,
        str(tmp_path / "demo"),
        template=DEMO_TEMPLATE,
        quick=True,
        fused="fused",
        experts=experts,
        progress=False,
    )
    assert list(results) == list(models)
    for r in results.values():
        assert {"truthfulqa_mc1", "truthfulqa_mc2", "truthful", "informative", "flagged_ratio", "win_rate"} <= set(r)
    assert "| fused (fused)" in table and "gain over best expert" in table
    assert (tmp_path / "demo" / "eval" / "report.png").exists()
    # the printed command reproduces the table from the saved models, judges and data
    args = shlex.split(command)
    assert args[:2] == ["h3fusion", "eval"]
    out = tmp_path / "again"
    args[args.index("--out") + 1] = str(out)
    assert main([*args[1:], "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
