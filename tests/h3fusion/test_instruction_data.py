"""Instruction records, JSON/JSONL loading, category labels from the fused config, masking and padding."""

from __future__ import annotations

import json
import random

import pytest
import torch
from h3fusion.data import (
    IGNORE_INDEX,
    InstructionCollator,
    InstructionDataset,
    InstructionExample,
    category_index,
    expert_names_from_config,
    format_prompt,
    load_instructions,
    save_instructions,
    tokenize_instruction,
)
from training_tiny import word_level_tokenizer

WORDS = "below is an instruction that describes a task write response appropriately completes the request".split()


def word_tokenizer(extra=()):
    return word_level_tokenizer(
        [*WORDS, "###", ":", ".", ",", "instruction", "response", "input", "Below", "Write", *extra]
    )


def _rand_word():
    return "".join(random.choice("abcdefgh") for _ in range(random.randint(1, 5)))


def test_json_and_jsonl_roundtrip(tmp_path):
    exs = [
        InstructionExample(_rand_word(), _rand_word(), random.choice(["helpful", "honest"]), random.choice(["", "x"]))
        for _ in range(7)
    ]
    save_instructions(exs, tmp_path / "d.jsonl")
    assert load_instructions(tmp_path / "d.jsonl") == exs
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": e.instruction, "output": e.output} for e in exs]))
    loaded = load_instructions(tmp_path / "d.json", category="harmless")
    assert [e.instruction for e in loaded] == [e.instruction for e in exs]
    assert {e.category for e in loaded} == {"harmless"}


def test_bad_records_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b", "category": "x"}\n{"instruction": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl\[1\].*output"):
        load_instructions(tmp_path / "bad.jsonl")
    (tmp_path / "nocat.json").write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(ValueError, match="category"):
        load_instructions(tmp_path / "nocat.json")


def test_labels_come_from_the_fused_configs_expert_names():
    # defect (f): labels must follow the model's expert names, whatever order categories appear in the data
    from transformers import MixtralConfig

    cfg = MixtralConfig(num_local_experts=3)
    cfg.h3fusion_expert_names = ["honest", "helpful", "harmless"]
    assert expert_names_from_config(cfg) == ["honest", "helpful", "harmless"]
    idx = category_index(expert_names_from_config(cfg))
    assert idx == {"honest": 0, "helpful": 1, "harmless": 2}
    cfg2 = MixtralConfig(num_local_experts=2, h3fusion={"experts": ["harmless", "helpful"], "top_k": 2})
    assert expert_names_from_config(cfg2) == ["harmless", "helpful"]
    with pytest.raises(ValueError, match="twice"):
        category_index(["a", "a"])
    with pytest.raises(ValueError, match="names no experts"):
        expert_names_from_config(MixtralConfig())


def test_prompt_is_masked_and_category_label_set():
    tok = word_tokenizer(extra=["hello", "world", "yes"])
    ex = InstructionExample("hello world", "yes yes", "honest")
    feat = tokenize_instruction(tok, ex, {"helpful": 0, "honest": 1})
    prompt, chat = format_prompt(tok, ex)
    assert not chat and "### Instruction:" in prompt  # no chat template -> Alpaca
    n_prompt = len(tok(prompt)["input_ids"])
    assert feat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]
    assert feat["input_ids"][-1] == tok.eos_token_id and feat["category_labels"] == 1
    with pytest.raises(ValueError, match="not an expert"):
        tokenize_instruction(tok, InstructionExample("a", "b", "harmless"), {"helpful": 0})


def test_chat_template_used_when_present():
    tok = word_tokenizer(extra=["user", "assistant", "hi", "ok"])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    prompt, chat = format_prompt(tok, InstructionExample("hi", "ok", "helpful"))
    assert chat and prompt == "user : hi assistant :"


def test_truncation_keeps_response_and_budget():
    tok = word_tokenizer(extra=["w"])
    ex = InstructionExample(" ".join(["w"] * 50), " ".join(["w"] * 30), "helpful")
    feat = tokenize_instruction(tok, ex, {"helpful": 0}, max_length=40)
    assert len(feat["input_ids"]) == 40
    assert sum(label != IGNORE_INDEX for label in feat["labels"]) == 20  # half the budget left for the response


def test_collator_pads_to_longest_in_batch():
    feats = [
        {"input_ids": list(range(3, 3 + n)), "labels": [IGNORE_INDEX] + list(range(4, 3 + n)), "category_labels": c}
        for n, c in ((random.randint(2, 6), 0), (random.randint(7, 9), 2))
    ]
    batch = InstructionCollator(pad_token_id=0)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (2, longest)  # the batch's longest, not a fixed max_length
    n0 = len(feats[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (longest - n0)
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n0:] == 0).all()
    assert batch["category_labels"].tolist() == [0, 2]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="pad_token_id"):
        InstructionCollator(None)


def test_dataset_builds_features():
    tok = word_tokenizer(extra=["a", "b"])
    ds = InstructionDataset(
        [InstructionExample("a", "b", "harmless"), InstructionExample("b", "a", "helpful")],
        tok,
        ["helpful", "harmless"],
        max_length=64,
    )
    assert len(ds) == 2 and ds[0]["category_labels"] == 1 and ds[1]["category_labels"] == 0


def test_paper_loaders_map_sources(monkeypatch):
    # The hub is unreachable here: feed the loaders in-memory rows shaped like the real datasets.
    import h3fusion.data.instructions as inst

    alpaca = [
        {"instruction": _rand_word(), "input": random.choice(["", "ctx"]), "output": _rand_word()} for _ in range(5)
    ]
    beaver = [{"prompt": _rand_word(), "response": _rand_word(), "is_safe": i % 2 == 0} for i in range(9)]
    tqa = [{"question": f"q{i}", "correct_answers": [f"a{i}_{j}" for j in range(1 + i % 3)]} for i in range(11)]
    calls = []

    def fake(name, *args, split=None):
        calls.append((name, args, split))
        return {"tatsu-lab/alpaca": alpaca, "PKU-Alignment/BeaverTails": beaver, "truthfulqa/truthful_qa": tqa}[name]

    monkeypatch.setattr(inst, "_load_dataset", fake)
    helpful = inst.load_alpaca()
    assert [(e.instruction, e.input, e.output) for e in helpful] == [
        (r["instruction"], r["input"], r["output"]) for r in alpaca
    ]
    assert {e.category for e in helpful} == {"helpful"}
    harmless = inst.load_beavertails()
    assert [e.instruction for e in harmless] == [r["prompt"] for r in beaver if r["is_safe"]]
    assert ("PKU-Alignment/BeaverTails", (), "30k_train") in calls
    train, test = inst.load_truthfulqa("train", seed=7), inst.load_truthfulqa("test", seed=7)
    assert ("truthfulqa/truthful_qa", ("generation",), "validation") in calls
    q_train, q_test = {e.instruction for e in train}, {e.instruction for e in test}
    assert not q_train & q_test and len(q_train) == 5 and len(q_test) == 6  # halves; questions never cross
    # one example per correct answer
    assert len(train) + len(test) == sum(len(r["correct_answers"]) for r in tqa)
    assert inst.load_truthfulqa("train", seed=7) == train  # fixed seed -> same split
    with pytest.raises(ValueError, match="part"):
        inst.load_truthfulqa("validation")


def test_numeric_category_and_bad_files_say_what_is_wrong(tmp_path):
    (tmp_path / "num.jsonl").write_text('{"instruction": "a", "output": "b", "category": 2}\n')
    with pytest.raises(ValueError, match=r"num.jsonl\[0\]: field 'category' must be a non-empty string.*got 2 \(int\)"):
        load_instructions(tmp_path / "num.jsonl", category="helpful")  # a default does not hide a wrong field
    (tmp_path / "null.jsonl").write_text('{"instruction": "a", "output": "b", "category": null}\n')
    assert load_instructions(tmp_path / "null.jsonl", category="helpful")[0].category == "helpful"
    (tmp_path / "latin.json").write_bytes('[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.json: not UTF-8 text \(byte 21\)"):
        load_instructions(tmp_path / "latin.json", category="helpful")
    (tmp_path / "cut.json").write_text('[{"instruction": "a", "output": "b"}')
    with pytest.raises(ValueError, match=r"cut.json: not valid JSON .*line 1"):
        load_instructions(tmp_path / "cut.json", category="helpful")


def test_template_with_an_unknown_field_is_a_clear_error():
    tok = word_tokenizer()
    ex = InstructionExample("a", "b", "helpful")
    with pytest.raises(ValueError, match=r"template '\{question\} :'.*KeyError.*only the fields \{instruction\}"):
        format_prompt(tok, ex, "{question} :")
    assert format_prompt(tok, ex, "{instruction} {{literal}} :")[0] == "a {literal} :"


def test_data_flag_rule_for_paths_with_equals(tmp_path, monkeypatch):
    # CATEGORY=FILE only when the text before the first "=" is a category name; otherwise the value is a path
    from h3fusion.cli.common import data_spec, load_data_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "k=v").mkdir()
    save_instructions([InstructionExample("a", "b", "helpful")], tmp_path / "k=v" / "d.jsonl")
    save_instructions([InstructionExample("c", "d", "honest")], tmp_path / "x=1.jsonl")
    assert data_spec("honest=k=v/d.jsonl") == ("honest", "k=v/d.jsonl")
    assert data_spec(f"{tmp_path}/x=1.jsonl") == (None, f"{tmp_path}/x=1.jsonl")
    assert data_spec("./x=1.jsonl") == (None, "./x=1.jsonl")
    assert data_spec("my data=1.json") == (None, "my data=1.json")  # a space: not a category name
    examples = load_data_arguments([data_spec("harmless=k=v/d.jsonl"), data_spec("./x=1.jsonl")])
    assert [(e.instruction, e.category) for e in examples] == [("a", "helpful"), ("c", "honest")]
    with pytest.raises(ValueError, match=r"--data: 1.jsonl does not exist.*read as CATEGORY=FILE.*\./x=1\.jsonl"):
        load_data_arguments([data_spec("x=1.jsonl")])  # category "x", file "1.jsonl": the message says how to fix
