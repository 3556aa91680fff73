"""The build itself: the library loads, registers every op, and has CUDA kernels when CI expects them."""

import os

import pytest
import torch

import h3fusion_ext

EXPECTED_OPS = [
    "topk_route",
    "topk_route_backward",
    "moe_route_plan",
    "moe_gather",
    "moe_combine",
    "moe_ffn_forward",
    "moe_ffn_backward",
    "linear_logprob_forward",
    "linear_logprob_backward",
    "has_cuda_kernels",
]


def test_every_op_is_registered():
    for name in EXPECTED_OPS:
        assert hasattr(torch.ops.h3fusion, name), name


@pytest.mark.skipif(os.environ.get("H3FUSION_EXPECT_CUDA") != "1", reason="H3FUSION_EXPECT_CUDA=1 not set (CI sets it)")
def test_cuda_kernels_built_when_expected():
    # CI sets H3FUSION_EXPECT_CUDA=1: a build that silently dropped the CUDA sources must fail there.
    assert h3fusion_ext.has_cuda_kernels(), "CUDA kernels were expected in this build but are missing"


def fatbin_entries(path: str) -> set[tuple[str, int]]:
    """The (kind, sm) pairs of the CUDA fat binaries embedded in a shared library: kind "ptx" or "elf", sm e.g. 80.

    Reads the fatbin container as nvcc (CUDA 12/13) writes it, without cuobjdump (not every toolkit ships it): a
    header (u32 magic 0xBA55ED50, u16 version, u16 header size, u64 payload size), then entries (u16 kind: 1 PTX,
    2 ELF; u16; u32 entry-header size; u64 payload size; u32 fields of which the fourth is the SM version).
    """
    import struct

    data = open(path, "rb").read()
    magic = struct.pack("<I", 0xBA55ED50)
    found: set[tuple[str, int]] = set()
    pos = data.find(magic)
    while pos >= 0:
        _version, header_size, payload_size = struct.unpack_from("<HHQ", data, pos + 4)
        entry, end = pos + header_size, pos + header_size + payload_size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<4I", data, entry + 16)[3]
            found.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
            entry += entry_header + entry_size
        pos = data.find(magic, end)
    return found


@pytest.mark.skipif(not h3fusion_ext.has_cuda_kernels(), reason="a CPU-only build has no device code to inspect")
def test_cuda_build_embeds_ptx_for_newer_gpus():
    # Forward compatibility: besides sm_80/sm_90a machine code (the default TORCH_CUDA_ARCH_LIST "8.0+PTX;9.0a"),
    # the library carries compute_80 PTX that a newer GPU's driver JIT-compiles, so the kernels run on architectures
    # released after the build. (A build with an explicit TORCH_CUDA_ARCH_LIST without +PTX is the user's choice.)
    if os.environ.get("TORCH_CUDA_ARCH_LIST") and "PTX" not in os.environ["TORCH_CUDA_ARCH_LIST"]:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} asks for no PTX")
    entries = fatbin_entries(h3fusion_ext._C.__file__)
    assert any(kind == "elf" for kind, _ in entries), f"no device code found: {entries}"
    assert any(kind == "ptx" for kind, _ in entries), f"no PTX in the build: {sorted(entries)}"
