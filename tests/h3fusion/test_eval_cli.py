"""`h3fusion eval` from the command line on a fused MoE model and its experts (saved here), the Table-1 report
with the fused model's gain over the best expert, `--compare`, and flag errors (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_tiny import causal_lm, classifier, data_files, save, tokenizer
from fusion_tiny import perturbed_copy
from h3fusion.cli import main
from h3fusion.evaluation.report import guess_roles, table

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fused_setup(tmp_path_factory):
    import torch
    from h3fusion import fuse_models, save_fused_model

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tok = tokenizer()
    base = causal_lm(tok)
    experts = {"helpful": perturbed_copy(base, 0.3), "honest": perturbed_copy(base, 0.3)}
    dirs = {"base": save(base, tok, root / "base")}
    for name, m in experts.items():
        dirs[f"aligned-{name}"] = save(m, tok, root / f"aligned-{name}")
    fused = fuse_models(base, experts, top_k=1, router_init="random")
    save_fused_model(fused, root / "fused", tokenizer=tok)
    dirs["fused"] = str(root / "fused")
    tqa, harmful, _ = data_files(root)
    mod = save(classifier(tok), tok, root / "mod")
    return root, dirs, tqa, harmful, mod


def _cli(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'python')}", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "h3fusion", "eval", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_end_to_end_with_fused_model(fused_setup, tmp_path):
    root, dirs, tqa, harmful, mod = fused_setup
    out = tmp_path / "out"
    args = [a for name, d in dirs.items() for a in ("--model", f"{name}={d}")]
    args += ["--suite", "honest,harmless", "--truthfulqa", tqa, "--harmful-prompts", harmful,
             "--moderation-model", mod, "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu",
             "--out", str(out)]  # fmt: skip
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "aligned-helpful", "aligned-honest", "fused"]
    assert {"truthfulqa_mc1", "truthfulqa_mc2", "flagged_ratio"} <= set(results["fused"])
    report = json.loads((out / "report.json").read_text())
    # the fused model is found from its config, its experts from the expert names it records
    assert report["fused"] == "fused" and report["experts"] == ["aligned-helpful", "aligned-honest"]
    for key, gain in report["gain_over_best_expert"].items():
        vals = [results[e][key] for e in report["experts"]]
        want = results["fused"][key] - max(vals) if key != "flagged_ratio" else min(vals) - results["fused"][key]
        assert gain == pytest.approx(want)
    assert "gain over best expert" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "gain over best expert" in proc.stdout
    # the same command again (in process, to save a start-up) resumes: nothing to do, same results
    assert main(["eval", *args, "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text()) == results

    # --compare joins two evaluations (a model present in both gets the folder name)
    assert main(["eval", "--compare", str(out), str(out), "--out", str(tmp_path / "cmp"), "--fused", "fused"]) == 0
    joined = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(joined) == 8 and joined["fused"] == results["fused"] and "fused (out)" in joined
    assert (tmp_path / "cmp" / "report.md").exists()
    # --compare refuses to write into an evaluation folder
    assert main(["eval", "--compare", str(out), "--out", str(out)]) == 2


def test_fused_model_runs_on_our_kernels(fused_setup):
    from h3fusion.evaluation.generation import load_lm
    from h3fusion.models.hf_experts import H3FusionExpertsMixin

    _, dirs, *_ = fused_setup
    model, _ = load_lm(dirs["fused"], "cpu")
    blocks = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    assert blocks and all(isinstance(b.experts, H3FusionExpertsMixin) for b in blocks)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "1.5"], "expected a number in [0, 1]"),
        (["--suite", "honest,funny"], "subset of helpful,harmless,honest"),
        (["--limit", "0"], "expected a positive integer"),
        (["--temperature", "-1"], "expected a number >= 0"),
    ],
)
def test_cli_bad_flags_exit_2(fused_setup, tmp_path, capsys, args, message):
    _, dirs, *_ = fused_setup
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", dirs["base"], "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_errors_name_the_flag(fused_setup, tmp_path, capsys):
    _, dirs, tqa, harmful, mod = fused_setup
    out = str(tmp_path / "o")
    assert main(["eval", "--out", out]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--out", out]) == 2
    assert "is not a folder" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "--model",
            dirs["base"],
            "--suite",
            "harmless",
            "--harmful-prompts",
            harmful,
            "--moderation-model",
            dirs["base"],
            "--out",
            out,
            "--device",
            "cpu",
        ]
    )
    assert code == 2 and "--moderation-model" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "--model",
            dirs["base"],
            "--suite",
            "honest",
            "--truthfulqa",
            tqa,
            "--backend",
            "vllm",
            "--out",
            out,
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert code == 2 and "vllm" in err
        assert not os.path.exists(out)  # every check runs before the output folder is made


def test_table_gain_direction_and_roles():
    results = {
        "base": {"truthfulqa_mc1": 0.2, "flagged_ratio": 0.5, "win_rate": 0.3},
        "aligned-helpful": {"truthfulqa_mc1": 0.3, "flagged_ratio": 0.4, "win_rate": 0.6},
        "aligned-harmless": {"truthfulqa_mc1": 0.25, "flagged_ratio": 0.1, "win_rate": 0.4},
        "soup": {"truthfulqa_mc1": 0.9, "flagged_ratio": 0.0, "win_rate": 0.9},
        "fused (H3Fusion)": {"truthfulqa_mc1": 0.35, "flagged_ratio": 0.2, "win_rate": 0.5},
    }
    fused, experts = guess_roles(results)
    assert fused == "fused (H3Fusion)" and experts == ["aligned-helpful", "aligned-harmless"]  # base/soup left out
    cols, rows, gain = table(results, fused, experts)
    assert [c[0] for c in cols] == ["truthfulqa_mc1", "flagged_ratio", "win_rate"]
    assert gain["truthfulqa_mc1"] == pytest.approx(0.05)  # 0.35 - best 0.3
    assert gain["flagged_ratio"] == pytest.approx(-0.1)  # lower is better: best 0.1 - 0.2
    assert gain["win_rate"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="not one of the evaluated models"):
        guess_roles(results, fused="nobody")


def test_public_api():
    import h3fusion
    from h3fusion.evaluation.runner import evaluate

    assert h3fusion.evaluate is evaluate
