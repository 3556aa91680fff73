"""Clear CLI errors for bad inputs (issue 8): each names the argument or file, exits 2, prints no traceback, and
leaves no output folder behind."""

from __future__ import annotations

import pytest
from h3fusion.cli import main
from h3fusion.data.preference import save_records
from pref_tiny import random_records, tiny_llama, tiny_tokenizer


@pytest.fixture
def pref_inputs(tmp_path):
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    save_records(random_records(3, per_source=2, sources=("alpha", "target")), tmp_path / "data.jsonl")
    return tmp_path


def _po(root, *extra):
    return ["fuse-po", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(root / "o"),
            "--max-steps", "1", "--device", "cpu", *extra]  # fmt: skip


def test_wrpo_target_source_that_is_not_in_the_data(pref_inputs, capsys):
    assert main(_po(pref_inputs, "--loss", "wrpo", "--target-source", "tagret")) == 2
    err = capsys.readouterr().err  # the data layer names the sources present; the CLI prints it as one line
    assert "'tagret' has no responses" in err and "['alpha', 'target']" in err and "Traceback" not in err
    assert "widen" not in err and not (pref_inputs / "o").exists()


def test_missing_inputs_are_named(pref_inputs, capsys):
    argv = _po(pref_inputs)
    argv[argv.index(str(pref_inputs / "data.jsonl"))] = str(pref_inputs / "nope.jsonl")
    assert main(argv) == 2
    assert f"--data: {pref_inputs / 'nope.jsonl'} does not exist" in capsys.readouterr().err
    argv = _po(pref_inputs)
    argv[argv.index(str(pref_inputs / "model"))] = str(pref_inputs / "no-model")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"the model folder {pref_inputs / 'no-model'} does not exist" in err
    assert "repo id" not in err and "Traceback" not in err
    (pref_inputs / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        main(["route-report", str(pref_inputs / "a-file"), "--data", "x.jsonl"])
    assert "is a file; expected a model folder" in capsys.readouterr().err
    assert not (pref_inputs / "o").exists()


def test_train_gammas_count_and_cuda_without_gpu(tmp_path, capsys):
    import torch
    from h3fusion.data import InstructionExample, save_instructions
    from training_tiny import EXPERT_NAMES, tiny_fused, word_level_tokenizer

    tok = word_level_tokenizer([":", "a", "b"])
    tiny_fused().save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    save_instructions([InstructionExample("a", "b", n) for n in EXPERT_NAMES], tmp_path / "d.jsonl")
    argv = ["train", str(tmp_path / "fused"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"),
            "--max-steps", "1"]  # fmt: skip
    assert main([*argv, "--device", "cpu", "--gammas", "0.1,0.2"]) == 2
    assert "--gammas: 2 values for 3 experts" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_deprecated_device_spellings_still_work(tmp_path, capsys):
    from h3fusion.cli import build_parser

    parser = build_parser()
    m = str(tmp_path)  # model folders are checked at parse time: any existing folder parses
    bases = {"train": [m, "--data", "d", "--out", "o"], "fuse-sft": ["--model", m, "--data", "d", "--out", "o"],
             "route-report": [m, "--data", "d"]}  # fmt: skip
    for command, old in [("train", "--no-cuda"), ("train", "--cpu"), ("fuse-sft", "--cpu"), ("route-report", "--cpu")]:
        assert parser.parse_args([command, *bases[command], old]).device == "cpu", (command, old)
        assert f"{old} is deprecated; use --device cpu" in capsys.readouterr().err
    assert parser.parse_args(["train", *bases["train"]]).device is None  # default: cuda when available
