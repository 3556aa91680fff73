"""A PEFT LoRA adapter seen as full weights: W = W_base + scaling · B · A, with PEFT's own scaling rule.

scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA (`use_rslora`), per module after
`rank_pattern` / `alpha_pattern`. The paper's public code dropped this factor (design.md §3 defect (b)).
"""

from __future__ import annotations

import math
import os
import re

import torch

from h3fusion.utils.files import read_json

from .weight_source import WeightSource, safetensors_error

__all__ = ["LoraAdapterWeights", "is_mlp_module", "lora_scaling"]

_PREFIX = "base_model.model."
# The modules an expert is made of; any other adapted module changes shared weights, not the expert.
_MLP_MODULE_RE = re.compile(r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)")


def is_mlp_module(name: str) -> bool:
    """Whether a module / parameter name (without PEFT's prefix) belongs to a decoder layer's MLP projections."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    return _MLP_MODULE_RE.fullmatch(module) is not None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies to module names that end with it (at a dot boundary) or match it as regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str) -> float:
    """The factor PEFT multiplies B·A by for `module` (e.g. "model.layers.0.mlp.up_proj").

    Args:
        config: the adapter's adapter_config.json as a dict.
        module: the module's full name without PEFT's "base_model.model." prefix.
    """
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


class LoraAdapterWeights(WeightSource):
    """The base model's weights with a LoRA adapter merged in, tensor by tensor (the adapter itself is small).

    Args:
        base: the base model's weights.
        path: the PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Raises:
        ValueError: the adapter is not LoRA, uses DoRA / LoRA biases / embedding LoRA, or has no safetensors weights.
    """

    def __init__(self, base: WeightSource, path: str | os.PathLike):
        from safetensors.torch import load_file

        self.base = base
        self.path = os.fspath(path)
        self.description = os.path.abspath(self.path)
        self.config = base.config
        self.adapter_config = cfg = read_json(os.path.join(self.path, "adapter_config.json"))
        if not isinstance(cfg, dict) or "r" not in cfg:
            raise ValueError(f"{self.path}/adapter_config.json is not a PEFT adapter config (no 'r')")
        if cfg.get("peft_type", "LORA").upper() != "LORA":
            raise ValueError(f"adapter {self.path!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get("use_dora", False):
            raise ValueError(f"adapter {self.path!r}: DoRA adapters are not supported (use_dora=true)")
        file = os.path.join(self.path, "adapter_model.safetensors")
        if not os.path.isfile(file):
            raise ValueError(f"adapter {self.path!r} has no adapter_model.safetensors")
        try:
            tensors = load_file(file)
        except Exception as exc:  # SafetensorError names no file
            raise safetensors_error(file, exc) from None
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._replace: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            if ".lora_embedding_" in name or name.endswith(".lora_B.bias"):
                raise ValueError(f"adapter {self.path!r}: {key} (embedding LoRA / LoRA bias) is not supported")
            if name.endswith(".lora_A.weight"):
                self._a[name[: -len(".lora_A.weight")]] = value
            elif name.endswith(".lora_B.weight"):
                self._b[name[: -len(".lora_B.weight")]] = value
            else:
                # modules_to_save: a full replacement tensor stored under the module's own name.
                self._replace[name.replace(".modules_to_save.default", "")] = value
        if set(self._a) != set(self._b):
            raise ValueError(f"adapter {self.path!r}: lora_A and lora_B weights do not pair up")
        self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

    def keys(self) -> set[str]:
        return self.base.keys()

    def adapted_modules(self) -> list[str]:
        """The modules (LoRA) and parameters (modules_to_save) this adapter changes, sorted."""
        return sorted(set(self._a) | set(self._replace))

    def non_mlp_modules(self) -> list[str]:
        """The adapted modules outside the decoder MLPs (attention, norms, embeddings, lm_head), sorted."""
        return [m for m in self.adapted_modules() if not is_mlp_module(m)]

    def delta(self, key: str) -> torch.Tensor | None:
        """The fp32 effective weight change scaling · B · A of parameter `key`, or None when not adapted."""
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module not in self._a:
            return None
        a, b = self._a[module].float(), self._b[module].float()
        d = (b @ a) * lora_scaling(self.adapter_config, module)
        return d.T if self._fan_in_fan_out else d

    def get(self, key: str) -> torch.Tensor:
        if key in self._replace:
            return self._replace[key]
        w = self.base.get(key)
        d = self.delta(key)
        if d is None:
            return w
        if d.shape != w.shape:
            raise ValueError(f"adapter {self.path!r}: delta of {key} has shape {tuple(d.shape)}, base {tuple(w.shape)}")
        return (w.float() + d).to(w.dtype)

    def dtype(self) -> torch.dtype:
        return self.base.dtype()
