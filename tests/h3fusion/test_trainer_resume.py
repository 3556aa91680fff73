"""Checkpoints: resume equals the uninterrupted run; an interrupted save leaves the previous checkpoint intact."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from h3fusion.data import InstructionCollator
from h3fusion.models.lora_experts import lora_experts_modules, merge_lora_experts
from h3fusion.trainers import H3FusionTrainer
from h3fusion.trainers.h3fusion_trainer import REFERENCE_FILE
from training_tiny import EXPERT_NAMES, separable_features, tiny_fused, word_level_tokenizer
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra OpenMP threads only spin-wait


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def make_trainer(model, out, data, seed, callbacks=None, lora_rank=None):
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    return H3FusionTrainer(
        model,
        args,
        train_dataset=data,
        data_collator=InstructionCollator(0),
        lambda_gate=0.5,
        gammas=[1e-2, 1e-3, 1e-1],
        lambda_balance=0.01,
        callbacks=callbacks,
        lora_rank=lora_rank,
    )


def trained_state(trainer):
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # PEFT
        model = copy.deepcopy(model).merge_and_unload()
    elif lora_experts_modules(model):  # our LoRAExperts
        model = merge_lora_experts(copy.deepcopy(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_resume_equals_uninterrupted(tmp_path, lora_rank):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    data = separable_features(16)
    init = tiny_fused()
    full = make_trainer(copy.deepcopy(init), tmp_path / "full", data, seed, lora_rank=lora_rank)
    full.train()
    expected = trained_state(full)

    part = make_trainer(copy.deepcopy(init), tmp_path / "part", data, seed, callbacks=[StopAt(3)], lora_rank=lora_rank)
    part.train()
    ckpt = get_last_checkpoint(str(tmp_path / "part"))
    assert ckpt is not None and ckpt.endswith("checkpoint-3")
    assert os.path.exists(os.path.join(ckpt, REFERENCE_FILE))

    resumed = make_trainer(copy.deepcopy(init), tmp_path / "part", data, seed, lora_rank=lora_rank)
    resumed.train(resume_from_checkpoint=ckpt)
    got = trained_state(resumed)
    assert resumed.state.global_step == 6
    assert set(got) == set(expected)
    changed = 0
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(expected[k], init.state_dict()[k])
    assert changed > 0
    # the logged loss terms after resume match the uninterrupted run's
    tail = [h["loss"] for h in full.state.log_history if "loss" in h][3:]
    tail_resumed = [h["loss"] for h in resumed.state.log_history if "loss" in h][-3:]
    assert tail == pytest.approx(tail_resumed, rel=1e-4)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    data = separable_features(16)
    trainer = make_trainer(tiny_fused(), tmp_path / "run", data, seed)
    calls = {"n": 0}
    original = trainer._save_optimizer_and_scheduler

    def crash_on_second(output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            # the model weights of checkpoint-6 are already half-written when the process "dies"
            raise KeyboardInterrupt("simulated crash mid-checkpoint")
        return original(output_dir)

    trainer._save_optimizer_and_scheduler = crash_on_second
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = tmp_path / "run"
    assert sorted(p for p in os.listdir(run) if not p.startswith(".")) == ["checkpoint-3"]
    assert any(p.startswith(".staging-") for p in os.listdir(run))  # the partial write stayed in staging
    last = get_last_checkpoint(str(run))
    assert last.endswith("checkpoint-3")
    for f in ("trainer_state.json", "optimizer.pt", "scheduler.pt", REFERENCE_FILE):
        assert os.path.exists(os.path.join(last, f)), f
    # a new trainer cleans the stale staging folder and resumes from the intact checkpoint
    again = make_trainer(tiny_fused(), run, data, seed)
    assert not any(p.startswith(".staging-") for p in os.listdir(run))
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 6
    assert get_last_checkpoint(str(run)).endswith("checkpoint-6")


def test_train_cli_lora_resume_auto(tmp_path):
    """`h3fusion train` with LoRA experts: checkpoints, `--resume auto` continues to max-steps, and the merged
    final model loads with plain from_pretrained and differs from the input only in routers and experts."""
    import random

    from h3fusion.cli import main
    from h3fusion.data import InstructionExample, save_instructions
    from transformers import AutoModelForCausalLM

    tok = word_level_tokenizer([":", *(f"w{i}" for i in range(30))])
    fused = tiny_fused()
    fused.save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    save_instructions(
        [
            InstructionExample(
                " ".join(f"w{random.randrange(30)}" for _ in range(random.randint(1, 5))),
                " ".join(f"w{random.randrange(30)}" for _ in range(random.randint(1, 4))),
                EXPERT_NAMES[i % 3],
            )
            for i in range(16)
        ],
        tmp_path / "d.jsonl",
    )
    common = [
        "train",
        str(tmp_path / "fused"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--template",
        "{instruction} :",
        "--lora-rank",
        "2",
        "--batch-size",
        "4",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--lr",
        "1e-2",
        "--gammas",
        "0.01",
        "--no-cuda",
        "--resume",
        "auto",
    ]
    assert main([*common, "--max-steps", "2"]) == 0
    assert get_last_checkpoint(str(tmp_path / "run")).endswith("checkpoint-2")
    assert main([*common, "--max-steps", "4"]) == 0  # resumes from checkpoint-2
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    before = fused.state_dict()
    for k, v in final.state_dict().items():
        trains = ".mlp.gate." in k or ".mlp.experts." in k
        assert torch.equal(v, before[k]) != trains, k


def test_train_cli_names_a_corrupted_checkpoint_on_resume(tmp_path, capsys):
    """A corrupted trainer_state.json or safetensors file in the checkpoint is named before training starts."""
    from h3fusion.cli import main
    from h3fusion.data import InstructionExample, save_instructions

    tok = word_level_tokenizer([":", *(f"w{i}" for i in range(30))])
    fused = tiny_fused()
    fused.save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    examples = [InstructionExample(f"w{i} w{i + 3}", f"w{i + 1}", EXPERT_NAMES[i % 3]) for i in range(8)]
    save_instructions(examples, tmp_path / "d.jsonl")
    common = ["train", str(tmp_path / "fused"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"),
              "--template", "{instruction} :", "--batch-size", "4", "--save-steps", "1", "--device", "cpu",
              "--resume", "auto"]  # fmt: skip
    assert main([*common, "--max-steps", "1"]) == 0
    ckpt = tmp_path / "run" / "checkpoint-1"
    state = ckpt / "trainer_state.json"
    good_state = state.read_text()
    state.write_text(good_state[: len(good_state) // 2])
    assert main([*common, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {state} is not valid JSON" in err and "Traceback" not in err
    state.write_text(good_state)
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main([*common, "--max-steps", "2"]) == 2
    assert f"--resume: {weights} is not a readable safetensors file" in capsys.readouterr().err
    assert main([*common[:-1], str(tmp_path / "nowhere"), "--max-steps", "2"]) == 2
    assert f"the checkpoint folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint-2").exists()
