"""Write a sharded safetensors checkpoint one tensor at a time (design.md §8), laid out like `save_pretrained`.

`safetensors.torch.save_file` takes a whole dict of tensors, so a writer built on it holds a full shard (up to
`max_shard_size`, 5 GB by default) in memory. The safetensors format is simple and documented (an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then the raw
little-endian bytes) and every tensor's shape and dtype is known before any weight is read, so the header can be
written first and the tensors streamed after it: a file is built while holding only the tensor being written.

Within a file the tensors are ordered as safetensors orders them (dtype, larger first, then name) and the header is
padded with spaces to a multiple of 8 bytes, so a file is byte-identical to `save_file` of the same tensors (tested).
The split into shards and the file names come from huggingface_hub's `split_state_dict_into_shards_factory`, the
function `save_pretrained` uses, so `max_shard_size` means the same and the index file is the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Mapping

import torch

from h3fusion.utils.files import atomic_write_text

__all__ = ["SAFE_INDEX", "SAFE_SINGLE", "TensorSpec", "plan_shards", "write_safetensors", "write_sharded"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# safetensors sorts a file's tensors by its dtype enum (F16 < BF16 < F32 < F64), descending, then by name
_DTYPE_RANK = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a tensor that will be written (known before the tensor exists)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self):
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {self.dtype} (one of {', '.join(map(str, _DTYPE_NAMES))})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def plan_shards(
    specs: Mapping[str, TensorSpec],
    max_shard_size: int | str,
    storage: Mapping[str, tuple[object, int]] | None = None,
):
    """Split tensors into shard files exactly as `save_pretrained(max_shard_size=...)` would, in `specs`' order.

    Args:
        specs: name -> shape and dtype, in the model's saved order.
        max_shard_size: bytes or a string like "5GB".
        storage: name -> (storage id, storage bytes) for tensors that `save_pretrained` would hold as views of one
            larger tensor (e.g. the experts of a layer, split from one stacked parameter): like huggingface_hub with
            real tensors, the first of them counts the whole storage and the others join its shard.

    Returns:
        huggingface_hub's `StateDictSplit`: `filename_to_tensors`, `tensor_to_filename`, `is_sharded`, `metadata`.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    storage = storage or {}
    keyed = {k: (k, spec) for k, spec in specs.items()}  # the factory sees (name, spec) to look the storage up
    split = split_state_dict_into_shards_factory(
        keyed,
        get_storage_size=lambda item: storage[item[0]][1] if item[0] in storage else item[1].nbytes,
        get_storage_id=lambda item: storage[item[0]][0] if item[0] in storage else None,
        filename_pattern=SAFE_SINGLE.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    return split


def _header(specs: Mapping[str, TensorSpec], order: list[str], metadata: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        spec = specs[key]
        header[key] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned (safetensors pads with spaces)


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write one safetensors file, asking `produce(name)` for each tensor only when it is written.

    Args:
        path: the file to write (plain write: callers write into a staging folder that is renamed when complete).
        specs: tensor name -> its shape and dtype.
        produce: name -> the tensor (any device; must have exactly the spec's shape and dtype).
        metadata: the header's `__metadata__` strings (`save_pretrained` writes {"format": "pt"}).

    Returns:
        The number of bytes written.

    Raises:
        ValueError: a produced tensor's shape or dtype differs from its spec (the message names the tensor).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this writer runs on little-endian machines only")
    order = sorted(specs, key=lambda k: (-_DTYPE_RANK[specs[k].dtype], k))
    header = _header(specs, order, metadata or {})
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        written += 8 + len(header)
        for key in order:
            spec = specs[key]
            tensor = produce(key)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"{key}: got shape {tuple(tensor.shape)} {tensor.dtype}, expected {spec.shape} {spec.dtype}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += spec.nbytes
            del tensor, data  # the next tensor is produced only after this one is freed
        f.flush()
        os.fsync(f.fileno())
    return written


def write_sharded(
    folder: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str,
    storage: Mapping[str, tuple[object, int]] | None = None,
    on_file: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Write `specs` into `folder` as `save_pretrained` lays a checkpoint out: `model.safetensors` when it fits one
    shard, else `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json`.

    Tensors are produced file by file (within a file in safetensors' order), one at a time.

    Args:
        folder: an existing (staging) folder.
        specs: tensor name -> shape and dtype, in the order that decides the shards (the model's order).
        produce: name -> the tensor.
        max_shard_size: bytes, or a string such as "5GB" (as `save_pretrained`).
        storage: shared storages, see `plan_shards`.
        on_file: called with (file name, bytes written) after each file (progress reporting).

    Returns:
        The file names written (shards, then the index when sharded).
    """
    split = plan_shards(specs, max_shard_size, storage)
    names = []
    for filename, keys in split.filename_to_tensors.items():
        n = write_safetensors(
            os.path.join(folder, filename), {k: specs[k] for k in keys}, produce, metadata={"format": "pt"}
        )
        names.append(filename)
        if on_file is not None:
            on_file(filename, n)
    if split.is_sharded:
        total_parameters = sum(spec.numel for spec in specs.values())
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        atomic_write_text(os.path.join(folder, SAFE_INDEX), json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(SAFE_INDEX)
    return names
