"""The streamed safetensors writer: files byte-identical to safetensors' save_file, shards and index as
save_pretrained plans them, bad tensors refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from h3fusion.models.safetensors_stream import TensorSpec, plan_shards, write_safetensors, write_sharded

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _random_tensors(n: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    out = {}
    for i in range(n):
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (), generator=g))]
        shape = tuple(int(s) for s in torch.randint(0, 5, (int(torch.randint(1, 4, (), generator=g)),), generator=g))
        out[f"t{int(torch.randint(0, 1000, (), generator=g))}.{i}.weight"] = torch.randn(shape, generator=g).to(dtype)
    out["scalarish"] = torch.ones(1, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 3)
    return out


def test_file_is_byte_identical_to_save_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    for _ in range(5):
        tensors = _random_tensors()
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
        asked = []
        n = write_safetensors(tmp_path / "ours.safetensors", specs, lambda k: asked.append(k) or tensors[k],
                              metadata={"format": "pt"})  # fmt: skip
        data = (tmp_path / "ours.safetensors").read_bytes()
        assert data == (tmp_path / "ref.safetensors").read_bytes()
        assert n == len(data) and sorted(asked) == sorted(tensors)
        with safe_open(tmp_path / "ours.safetensors", "pt") as h:
            for k, v in tensors.items():
                assert torch.equal(h.get_tensor(k), v)


def test_wrong_tensor_is_named(tmp_path):
    specs = {"a": TensorSpec((2, 3), torch.float32), "b": TensorSpec((4,), torch.bfloat16)}
    with pytest.raises(ValueError, match=r"b: got shape \(4,\) torch.float32, expected \(4,\) torch.bfloat16"):
        write_safetensors(tmp_path / "x.safetensors", specs, lambda k: torch.zeros(specs[k].shape))
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec((1,), torch.int64)


@pytest.mark.parametrize("max_shard_size", [100, "1KB", 10**9])
def test_shards_and_index_match_save_pretrained_planning(tmp_path, max_shard_size):
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open

    tensors = {f"layer{i}.w": torch.randn(int(torch.randint(1, 40, ())), 4) for i in range(12)}
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    want = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    got = plan_shards(specs, max_shard_size)
    assert got.filename_to_tensors == want.filename_to_tensors and got.metadata == want.metadata
    files = write_sharded(tmp_path, specs, tensors.__getitem__, max_shard_size=max_shard_size)
    assert files[: len(want.filename_to_tensors)] == list(want.filename_to_tensors)
    if want.is_sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == want.tensor_to_filename
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
        assert index["metadata"]["total_parameters"] == sum(v.numel() for v in tensors.values())
    else:
        assert files == ["model.safetensors"]
    for file, keys in want.filename_to_tensors.items():
        with safe_open(tmp_path / file, "pt") as h:
            assert sorted(h.keys()) == sorted(keys)
            assert all(torch.equal(h.get_tensor(k), tensors[k]) for k in keys)


def test_shared_storage_joins_the_first_views_shard():
    """Views of one stacked tensor stay together, counted once at the full storage size (as with real tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    stacked = torch.randn(3, 8, 4)
    tensors = {"a": torch.randn(10, 4), **{f"e{i}": stacked[i] for i in range(3)}, "b": torch.randn(30, 4)}
    want = split_torch_state_dict_into_shards(tensors, max_shard_size=500)
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    storage = {f"e{i}": ("stacked", stacked.nbytes) for i in range(3)}
    got = plan_shards(specs, 500, storage)
    assert got.filename_to_tensors == want.filename_to_tensors
    assert plan_shards(specs, 500).filename_to_tensors != want.filename_to_tensors
