"""`h3fusion score`: rewards through the reward model's own chat template, batching, resume, summary, errors."""

from __future__ import annotations

import json

import pytest
import torch
from fuserl_tiny import make_reward_model, read_jsonl
from h3fusion.cli import main
from h3fusion.fuserl.scoring import RewardModel, reward_summary, score_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return make_reward_model(tmp_path_factory.mktemp("rm") / "rm", seed=5)


def _sampled(path, n=5):
    words = "the cat sat on a mat and ran".split()
    recs = []
    for i in range(n):
        responses = [
            {"source": s, "text": " ".join(words[: 1 + (i + j) % 7]), "sample": j}
            for s in ("alpha", "beta")
            for j in range(2 if s == "alpha" else 1 + i % 2)
        ]
        rec = {"id": i, "prompt": f"why {words[i % 7]} ?", "responses": responses}
        if i == 1:
            rec["messages"] = [{"role": "system", "content": "be good"}, {"role": "user", "content": rec["prompt"]}]
        recs.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _reference_reward(folder, messages, response, index=0):
    """The reward computed by hand: the classifier's output at the last token of the templated conversation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    text = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    assert text.endswith(f"assistant : {response} ")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, index].item()


def test_rewards_match_a_hand_computation_and_batching(reward_model, tmp_path):
    inp = _sampled(tmp_path / "s.jsonl")
    summary = score_file(reward_model, inp, tmp_path / "a.jsonl", batch_size=3)
    one = score_file(reward_model, inp, tmp_path / "b.jsonl", batch_size=1)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    src = read_jsonl(inp)
    for ra, rb, rs in zip(a, b, src, strict=True):
        assert {k: v for k, v in ra.items() if k != "responses"} == {k: v for k, v in rs.items() if k != "responses"}
        for x, y, z in zip(ra["responses"], rb["responses"], rs["responses"], strict=True):
            assert {k: v for k, v in x.items() if k != "reward"} == z
            assert x["reward"] == pytest.approx(y["reward"], abs=1e-5)
    rewards = [r["reward"] for rec in a for r in rec["responses"]]
    assert max(rewards) - min(rewards) > 1e-3  # the rewards differ between responses
    msgs = src[1]["messages"]
    assert a[1]["responses"][0]["reward"] == pytest.approx(
        _reference_reward(reward_model, msgs, src[1]["responses"][0]["text"]), abs=1e-5
    )
    user = [{"role": "user", "content": src[2]["prompt"]}]
    assert a[2]["responses"][-1]["reward"] == pytest.approx(
        _reference_reward(reward_model, user, src[2]["responses"][-1]["text"]), abs=1e-5
    )
    assert summary["rewards"] == reward_summary(a) and one["records"] == 5
    alpha = [r["reward"] for rec in a for r in rec["responses"] if r["source"] == "alpha"]
    assert summary["rewards"]["alpha"]["count"] == 10
    assert summary["rewards"]["alpha"]["mean"] == pytest.approx(sum(alpha) / 10)
    assert (tmp_path / "a.jsonl.rewards.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a.jsonl.meta.json").read_text())["status"] == "complete"


def test_killed_scoring_resumes(reward_model, tmp_path):
    inp = _sampled(tmp_path / "s.jsonl", n=6)
    score_file(reward_model, inp, tmp_path / "full.jsonl", batch_size=4)

    class Killed(Exception):
        pass

    def kill(done, total):
        if done >= 3:
            raise Killed

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        score_file(reward_model, inp, out, batch_size=4, progress=kill)
    assert not out.exists()
    done = read_jsonl(tmp_path / "out.jsonl.work" / "scored.jsonl")
    assert 3 <= len(done) < 6
    score_file(reward_model, inp, out, batch_size=4)
    full, resumed = read_jsonl(tmp_path / "full.jsonl"), read_jsonl(out)
    assert len(resumed) == 6
    for x, y in zip(full, resumed, strict=True):
        assert [r["text"] for r in x["responses"]] == [r["text"] for r in y["responses"]]
        assert [r["reward"] for r in x["responses"]] == pytest.approx([r["reward"] for r in y["responses"]], abs=1e-5)


def test_output_index_of_a_multi_output_head(tmp_path):
    rm3 = make_reward_model(tmp_path / "rm3", seed=6, num_labels=3)
    inp = _sampled(tmp_path / "s.jsonl", n=2)
    with pytest.raises(ValueError, match=r"outputs 3 values per sequence; choose the reward with --reward-index"):
        score_file(rm3, inp, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="reward_index 3 is outside its 3 outputs"):
        score_file(rm3, inp, tmp_path / "o.jsonl", reward_index=3)
    score_file(rm3, inp, tmp_path / "o.jsonl", reward_index=2)
    rec = read_jsonl(inp)[0]
    user = [{"role": "user", "content": rec["prompt"]}]
    got = read_jsonl(tmp_path / "o.jsonl")[0]["responses"][0]["reward"]
    assert got == pytest.approx(_reference_reward(rm3, user, rec["responses"][0]["text"], index=2), abs=1e-5)


def test_reward_model_errors(tmp_path):
    inp = _sampled(tmp_path / "s.jsonl", n=2)
    lm = make_reward_model(tmp_path / "lm", head=False)
    with pytest.raises(ValueError, match=r"reward model .*lm has no scoring head.*score\.weight"):
        RewardModel(lm)
    plain = make_reward_model(tmp_path / "plain", chat_template=False)
    with pytest.raises(ValueError, match=r"reward model .*plain has no chat template"):
        RewardModel(plain)
    remote = make_reward_model(tmp_path / "remote", remote_code=True)
    with pytest.raises(ValueError, match=r"reward model .*remote .*--trust-remote-code"):
        score_file(remote, inp, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.work").exists()  # checked before writing


@pytest.mark.parametrize(
    "record,match",
    [
        ({"prompt": "p", "responses": [{"source": "a"}]}, r"s\.jsonl:2\.responses\[0\]: 'text' must be a string"),
        ({"prompt": "p", "responses": [{"text": "t"}]}, r"s\.jsonl:2\.responses\[0\]: 'source' must be a string"),
        ({"responses": []}, r"s\.jsonl:2: 'prompt' must be a string"),
        ({"prompt": "p", "responses": "x"}, r"s\.jsonl:2: 'responses' must be a list"),
    ],
)
def test_malformed_records(record, match, reward_model, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "responses": []}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=match):
        score_file(reward_model, path, tmp_path / "o.jsonl")


def test_score_cli(reward_model, tmp_path, capsys):
    inp = _sampled(tmp_path / "s.jsonl", n=2)
    out = tmp_path / "o.jsonl"
    assert main(["score", "--reward-model", reward_model, "--in", str(inp), "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    assert all(isinstance(r["reward"], float) for rec in read_jsonl(out) for r in rec["responses"])
    bad = make_reward_model(tmp_path / "lm", head=False)
    assert main(["score", "--reward-model", bad, "--in", str(inp), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no scoring head" in capsys.readouterr().err
