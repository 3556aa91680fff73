"""The interface fusion reads weights through, shared by checkpoint folders, in-memory models and LoRA adapters.

Its own module so that `checkpoint_io` (which opens sources) and `lora_merge` (one kind of source) both depend on it
and not on each other.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["WeightSource", "safetensors_error"]


class WeightSource:
    """A named set of tensors in the Hugging Face causal-LM layout (`model.layers.0.mlp.gate_proj.weight`, ...).

    Attributes:
        config: the model's `PretrainedConfig`.
        description: where the weights come from (a path or a short model description), recorded in the fused config.
    """

    config: Any
    description: str

    def keys(self) -> set[str]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (a fresh or read-only view; callers must not modify it in place)."""
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in."""
        return self.get("model.embed_tokens.weight").dtype

    def has(self, key: str) -> bool:
        return key in self.keys()


def safetensors_error(file: str | os.PathLike, exc: BaseException, tensor: str | None = None) -> ValueError:
    """A ValueError naming a safetensors file that could not be read (safetensors' own errors name no file)."""
    what = f" (tensor {tensor!r})" if tensor else ""
    return ValueError(f"{os.fspath(file)}: cannot read this safetensors file{what}; corrupted or truncated ({exc})")
