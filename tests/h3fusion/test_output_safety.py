"""No data loss from the CLI (issue 8 items 11-13): output folders we did not write are never replaced or emptied,
inputs are never outputs, a run holds a lock on its folder, and every output path is checked before the work starts.
"""

from __future__ import annotations

import json
import os

import pytest
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion.cli import main
from h3fusion.data import InstructionExample, save_instructions
from h3fusion.models.fuse import fuse_models, save_fused_model
from h3fusion.utils.files import LOCK_FILE, OUTPUT_MARKER, OutputDirError, output_lock
from pref_tiny import tiny_tokenizer
from training_tiny import EXPERT_NAMES, tiny_fused, word_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fuse_inputs(tmp_path):
    tok = tiny_tokenizer()
    base = build_tiny_llama(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    perturbed_copy(base).save_pretrained(tmp_path / "a")
    perturbed_copy(base).save_pretrained(tmp_path / "b")
    return tmp_path


def _fuse(root, out, *extra):
    return main(
        ["fuse", "--base", str(root / "base"), "--expert", f"a={root / 'a'}", "--expert", f"b={root / 'b'}",
         "--top-k", "1", "--no-progress", "--out", str(out), *extra]
    )  # fmt: skip


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def test_fuse_never_deletes_what_it_did_not_write(fuse_inputs, monkeypatch, capsys):
    root = fuse_inputs
    base_before = _tree(root / "base")
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(root)
    for out, message in [
        (".", "working directory"),
        (root, "working directory"),
        (root / "base", "overlaps the input"),
        (root / "base" / "sub", "overlaps the input"),
        (mine, "not written by h3fusion"),
    ]:
        assert _fuse(root, out, "--overwrite") == 2, out
        assert message in capsys.readouterr().err, out
    (root / "file.txt").write_text("x")
    assert _fuse(root, root / "file.txt") == 2
    assert "not a directory" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (root / "file.txt").read_text() == "x"
    assert _tree(root / "base") == base_before
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "base", "file.txt", "mine"]


def test_fuse_output_folder_is_ours_to_replace_only_with_overwrite(fuse_inputs, capsys):
    root = fuse_inputs
    old = os.umask(0o022)
    try:
        assert _fuse(root, root / "fused", "--seed", "1") == 0
    finally:
        os.umask(old)
    out = root / "fused"
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    assert (out / OUTPUT_MARKER).is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "base", "fused"]  # no staging folder left
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _fuse(root, out, "--seed", "2") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    assert _fuse(root, out, "--seed", "2", "--overwrite") == 0
    assert (out / "model.safetensors").read_bytes() != first  # replaced (other router seed)


def test_save_fused_model_refuses_user_folders(tmp_path):
    base = build_tiny_llama()
    fused = fuse_models(base, {"a": perturbed_copy(base), "b": perturbed_copy(base)}, top_k=1, progress=False)
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not written by h3fusion"):
        save_fused_model(fused, user)
    assert (user / "keep.txt").read_text() == "keep"
    save_fused_model(fused, tmp_path / "f")
    with pytest.raises(OutputDirError, match="pass --overwrite"):
        save_fused_model(fused, tmp_path / "f")
    save_fused_model(fused, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f" / OUTPUT_MARKER).is_file()


def test_fuse_checks_outputs_and_options_before_work(fuse_inputs, capsys):
    root = fuse_inputs
    with pytest.raises(SystemExit) as exc:
        _fuse(root, root / "o", "--max-shard-size", "5 gigs")
    assert exc.value.code == 2
    assert "--max-shard-size: expected a size like 5GB" in capsys.readouterr().err
    assert _fuse(root, root / "o", "--router-init", "prototypes") == 2
    assert "needs --prototype-prompts" in capsys.readouterr().err
    assert not (root / "o").exists()


@pytest.fixture
def train_inputs(tmp_path):
    words = [f"w{i}" for i in range(30)]
    tok = word_level_tokenizer([":", *words])
    fused = tiny_fused()
    fused.save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    examples = [InstructionExample(f"w{i} w{i + 1}", f"w{i + 2}", EXPERT_NAMES[i % 3]) for i in range(8)]
    save_instructions(examples, tmp_path / "d.jsonl")
    return tmp_path


def _train_argv(root, out, *extra):
    return ["train", str(root / "fused"), "--data", str(root / "d.jsonl"), "--out", str(out), "--template",
            "{instruction} :", "--batch-size", "4", "--max-steps", "1", "--save-steps", "1", "--device", "cpu",
            *extra]  # fmt: skip


def test_train_holds_a_lock_on_its_output_folder(train_inputs, capsys):
    out = train_inputs / "run"
    with output_lock(out):  # another run of ours holds the folder
        assert main(_train_argv(train_inputs, out)) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the refused run was written
    assert main(_train_argv(train_inputs, out)) == 0  # the lock went with its holder
    assert (out / "final" / "config.json").is_file() and (out / OUTPUT_MARKER).is_file()
    assert main(_train_argv(train_inputs, out)) == 2  # a finished run is not silently trained over
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(_train_argv(train_inputs, out, "--overwrite", "--resume", "auto")) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_train_refuses_user_folder_and_empty_data(train_inputs, capsys):
    user = train_inputs / "user"
    user.mkdir()
    (user / "x.txt").write_text("x")
    assert main(_train_argv(train_inputs, user)) == 2
    assert "not written by h3fusion" in capsys.readouterr().err
    (train_inputs / "empty.jsonl").write_text("")
    argv = _train_argv(train_inputs, train_inputs / "new")
    argv[argv.index(str(train_inputs / "d.jsonl"))] = str(train_inputs / "empty.jsonl")
    assert main(argv) == 2
    assert "hold no examples" in capsys.readouterr().err
    assert not (train_inputs / "new").exists()  # no empty output folder left behind


@pytest.mark.parametrize("command", ["fuse-sft", "fuse-po"])
def test_preference_training_holds_the_lock(tmp_path, command, capsys):
    from h3fusion.data.preference import save_records
    from pref_tiny import random_records, tiny_llama

    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    save_records(random_records(3, per_source=2), tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = [command, "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"), "--out", str(out),
            "--max-steps", "1", "--device", "cpu"]  # fmt: skip
    with output_lock(out):
        assert main(argv) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert main([*argv[:6], str(tmp_path / "model"), *argv[7:], "--overwrite"]) == 2  # --out = the input model
    assert "overlaps the input" in capsys.readouterr().err


def test_route_report_and_demo_refuse_user_folders(train_inputs, capsys):
    user = train_inputs / "user"
    user.mkdir()
    (user / "x.txt").write_text("x")
    argv = ["route-report", str(train_inputs / "fused"), "--data", str(train_inputs / "d.jsonl"), "--out", str(user),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "not written by h3fusion" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(user)]) == 2
    assert "not written by h3fusion" in capsys.readouterr().err
    assert sorted(p.name for p in user.iterdir()) == ["x.txt"]
    # a report folder of ours is replaced with --overwrite only
    report = train_inputs / "report"
    argv[argv.index(str(user))] = str(report)
    argv += ["--template", "{instruction} :"]
    assert main(argv) == 0
    assert json.loads((report / "route_report.json").read_text())["expert_names"] == EXPERT_NAMES
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_bench_checks_out_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", ",", "--out", str(tmp_path / "r.json")])
    assert exc.value.code == 2 and "without empty items" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 2  # a folder: refused at once
    assert "is a directory" in capsys.readouterr().err
