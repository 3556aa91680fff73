"""Weight sources for fusion: read one tensor at a time from a loaded model or a safetensors checkpoint directory.

A source never materialises a whole model: `CheckpointWeights.get` opens the shard holding one tensor and reads only
that tensor, so fusing N aligned 7B checkpoints holds one layer of each at a time, not N full models.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from h3fusion.utils.files import read_json

from .lora_merge import LoraAdapterWeights
from .weight_source import WeightSource, safetensors_error

__all__ = ["CheckpointWeights", "ModelWeights", "WeightSource", "is_adapter_dir", "open_source"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _tied(config) -> bool:
    tied = getattr(config, "tie_word_embeddings", False)
    text = getattr(config, "get_text_config", None)
    if text is not None:
        tied = getattr(text(), "tie_word_embeddings", tied)
    return bool(tied)


class ModelWeights(WeightSource):
    """Weights of a model already in memory (any `PreTrainedModel` with a causal-LM head)."""

    def __init__(self, model, description: str | None = None):
        self.model = model
        self.config = model.config
        self.description = description or f"<in-memory {type(model).__name__}>"
        self._state = {k: v.detach() for k, v in model.state_dict().items()}
        if "lm_head.weight" not in self._state and _tied(self.config) and "model.embed_tokens.weight" in self._state:
            self._state["lm_head.weight"] = self._state["model.embed_tokens.weight"]

    def keys(self) -> set[str]:
        return set(self._state)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise KeyError(f"{self.description} has no weight named {key!r}") from None

    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


class CheckpointWeights(WeightSource):
    """Weights of a Hugging Face checkpoint directory (config.json + safetensors, single file or sharded), read lazily.

    Args:
        path: the checkpoint directory.

    Raises:
        ValueError: the directory has no config.json or no safetensors weights.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoConfig

        self.path = os.fspath(path)
        self.description = os.path.abspath(self.path)
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise ValueError(f"{self.path!r} is not a model checkpoint directory: it has no config.json")
        self.config = AutoConfig.from_pretrained(self.path)
        self._handles: dict[str, Any] = {}
        index = os.path.join(self.path, SAFE_INDEX)
        single = os.path.join(self.path, SAFE_SINGLE)
        if os.path.isfile(index):
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} is not a safetensors index (expected an object with a weight_map)")
            self._where = {k: (os.path.join(self.path, v), k) for k, v in weight_map.items()}
            for file in sorted({f for f, _ in self._where.values()}):
                if not os.path.isfile(file):
                    raise ValueError(f"{index} names the shard {os.path.basename(file)}, which is missing")
        elif os.path.isfile(single):
            self._where = {k: (single, k) for k in self._open(single).keys()}
        else:
            raise ValueError(
                f"{self.path!r} has no {SAFE_SINGLE} or {SAFE_INDEX}; only safetensors checkpoints can be fused "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        # Some checkpoints store the bare decoder (LlamaModel) without the "model." prefix.
        if not any(k.startswith("model.") for k in self._where):
            self._where = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in self._where.items()}
        self._alias = {}
        if "lm_head.weight" not in self._where and _tied(self.config):
            self._alias["lm_head.weight"] = "model.embed_tokens.weight"

    def keys(self) -> set[str]:
        return set(self._where) | set(self._alias)

    def _open(self, file: str):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:  # SafetensorError (corrupted / truncated header) or OSError
                raise safetensors_error(file, exc) from None
            self._handles[file] = handle
        return handle

    def get(self, key: str) -> torch.Tensor:
        key = self._alias.get(key, key)
        if key not in self._where:
            raise KeyError(f"checkpoint {self.path!r} has no weight named {key!r}")
        file, stored = self._where[key]
        handle = self._open(file)
        try:
            return handle.get_tensor(stored)
        except Exception as exc:
            raise safetensors_error(file, exc, stored) from None

    def dtype(self) -> torch.dtype:
        # Read the dtype from the safetensors header, not by loading the (large) embedding matrix.
        key = self._alias.get("model.embed_tokens.weight", "model.embed_tokens.weight")
        if key in self._where:
            file, stored = self._where[key]
            with contextlib.suppress(Exception):
                return _SAFE_DTYPES[self._open(file).get_slice(stored).get_dtype()]
        return self.get("model.embed_tokens.weight").dtype

    def close(self) -> None:
        self._handles.clear()


def is_adapter_dir(path: Any) -> bool:
    """True when `path` is a directory holding a PEFT adapter (adapter_config.json)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def open_source(spec: Any, base: WeightSource | None = None, name: str = "base") -> WeightSource:
    """Turn a model, a checkpoint directory or (given `base`) a PEFT LoRA adapter directory into a WeightSource.

    Args:
        spec: a loaded `PreTrainedModel`, a checkpoint directory, or a LoRA adapter directory.
        base: the base model's source, needed for adapters (adapter = base + scaled delta).
        name: the expert name, for error messages.

    Raises:
        ValueError: `spec` is none of the above, or an adapter is given where no base is available.
    """
    if isinstance(spec, WeightSource):
        return spec
    if isinstance(spec, torch.nn.Module):
        if hasattr(spec, "peft_config"):
            raise ValueError(
                f"{name}: an in-memory PEFT model; pass its adapter directory (save_pretrained) or merge_and_unload()"
            )
        if not hasattr(spec, "config"):
            raise ValueError(f"{name}: a torch module without a Hugging Face config cannot be fused")
        return ModelWeights(spec)
    if isinstance(spec, (str, os.PathLike)):
        if not os.path.exists(spec):
            raise ValueError(f"{name}: the folder {os.fspath(spec)} does not exist")
        if not os.path.isdir(spec):
            raise ValueError(f"{name}: {os.fspath(spec)} is a file; expected a checkpoint or LoRA adapter folder")
        if is_adapter_dir(spec):
            if base is None:
                raise ValueError(f"{name}: {os.fspath(spec)!r} is a LoRA adapter; the base model must be a full model")
            return LoraAdapterWeights(base, spec)
        return CheckpointWeights(spec)
    raise ValueError(f"{name}: expected a model, a checkpoint directory or an adapter directory, got {type(spec)}")
