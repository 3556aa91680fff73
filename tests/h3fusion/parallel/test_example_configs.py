"""The accelerate config files shipped in examples/ load with accelerate's own parser and say what they claim."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(os.path.join(ROOT, "examples", name))


def test_fsdp2_config():
    cfg = _load("accelerate_fsdp2.yaml")
    assert str(cfg.distributed_type).endswith("FSDP")
    assert int(cfg.fsdp_config["fsdp_version"]) == 2
    assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MixtralDecoderLayer"


def test_deepspeed_zero3_config():
    cfg = _load("accelerate_deepspeed_zero3.yaml")
    assert str(cfg.distributed_type).endswith("DEEPSPEED")
    assert int(cfg.deepspeed_config["zero_stage"]) == 3
