"""moe_ffn on experts with few rows, where the CPU runs its own GEMMs (csrc/cpu/small_gemm.h) instead of BLAS: every
row count 1..8 in one call (all three GEMM forms), 9..48 rows (fp32 tiles: AVX-512 dot-product tiles, or on AVX2 CPUs
narrow_tiles.h's broadcast tiles of all three forms; bf16 VDPBF16PS tiles of all three forms where the CPU has them,
else bf16 widened onto the fp32 ones), widths that leave every vector and tile tail, fp32 and bf16, all four
gradients."""

from __future__ import annotations

import pytest
import torch
from test_moe_ffn import check_against_fp64, run_with_grads

import h3fusion_ext
from h3fusion_ext import reference

SMALL_MAX_ROWS = 8  # kSmallGemmMaxRows
MID_MAX_ROWS = 48  # kMidGemmMaxRows


def routed_inputs(rows_per_expert, H, F, dtype, k=1, seed=0):
    """Inputs whose expert e gets exactly rows_per_expert[e] (token, slot) pairs; k slots per token, distinct experts
    per token (slot j of token t goes to expert (perm[t] + j) mod E)."""
    g = torch.Generator().manual_seed(seed)
    E = len(rows_per_expert)
    if k == 1:
        experts = torch.cat([torch.full((n,), e) for e, n in enumerate(rows_per_expert)])
        experts = experts[torch.randperm(len(experts), generator=g)].view(-1, 1)
    else:  # each token covers k consecutive experts; rows per expert are then what the test reads back
        T = sum(rows_per_expert) // k
        start = torch.randint(0, E, (T,), generator=g)
        experts = (start.view(-1, 1) + torch.arange(k)) % E
    T = experts.shape[0]
    weights = torch.softmax(torch.randn(T, experts.shape[1], generator=g), dim=-1)
    x = torch.randn(T, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * F, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, F, generator=g) / F**0.5).to(dtype)
    return x, weights, experts.to(torch.int32), gate_up, down


def check_all(inputs):
    # bf16's routing-weight gradient gets check_against_fp64's factor 6 (U . act with U rounded; see there).
    return check_against_fp64(inputs, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "H,F",
    [
        (64, 32),  # whole vectors everywhere
        (53, 40),  # H: 3 vectors + 5; F: one 32-column block + 8
        (80, 24),  # H: two 32-column blocks + one 16-column block; F: one vector + 8
        (7, 5),  # narrower than one vector: scalar paths only
    ],
)
def test_every_small_row_count_matches_reference(dtype, H, F):
    # Experts with 1..8 rows (the small kernels), one with 9 and one with none (BLAS and the zero-gradient path).
    rows = list(range(1, SMALL_MAX_ROWS + 1)) + [SMALL_MAX_ROWS + 1, 0]
    check_all(routed_inputs(rows, H, F, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,F", [(7, 5), (53, 40), (64, 32)])
def test_experts_without_rows_get_exact_zero_gradients(dtype, H, F):
    # The first expert's gradients start 16-byte aligned, so they are zeroed with streaming stores (zero_gradient);
    # at H7 F5 and H53 F40 their sizes leave a tail of bytes after the last 16-byte store (bf16 H7 F5: 140 and 70
    # bytes). The weight gradients of the experts with rows are written with streaming stores where their rows are
    # 16-byte aligned (H64 F32). Two calls, so the second one's buffers may hold the first one's bytes; both give the
    # same bits. (Accuracy against the reference: the tests above, at the same widths.)
    rows = [0, 3, 1, 0, 2, 8]
    inputs = routed_inputs(rows, H, F, dtype, seed=3)
    grad_y = torch.randn_like(inputs[0])
    first = run_with_grads(h3fusion_ext.moe_ffn, inputs, grad_y)[1]
    second = run_with_grads(h3fusion_ext.moe_ffn, inputs, grad_y)[1]
    for g, g2 in zip(first[2:], second[2:], strict=True):
        assert torch.equal(g[[0, 3]], torch.zeros_like(g[[0, 3]]))
        assert g[[1, 2, 4, 5]].abs().amax(dim=(1, 2)).min() > 0
        assert torch.equal(g, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "H,F",
    [
        (64, 32),  # whole vectors and tiles
        (53, 39),  # 53, 78 weight rows: 4-row tiles with 1 and 2 left over; U = dY W_down has an odd K (53)
        (75, 41),  # K tails of 11 (H) and 9 (F) in 32-wide steps; 64-column strips with 11 left; 16-column tails
        (20, 12),  # narrower than one 32-column half: the second half's mask is empty
        (55, 26),  # AVX2 broadcast tiles: 55 = 9 x 6 + 1 weight rows (a 1-row tile), 26 = 16 + 8 + 2 columns
        (160, 72),  # AVX2 a.b tiles over two panels of b (K 160 = 128 + 32 and 144 = 128 + 16), padded strips
    ],
)
def test_tiles_up_to_48_rows_match_reference(dtype, H, F):
    # 9..48 rows: fp32 forward projections in 4x4 tiles, bf16 tiles of all three forms (row counts that leave 2- and
    # 1-row tiles, odd counts that pair the last row with zero in the weight gradients); 49: BLAS again (but for the
    # fp32 forward projections on AVX2 CPUs: the test below). On AVX2 the
    # a.w^T broadcast tiles take a's full blocks of 16 rows and dot products the rest, in pairs and a last single row
    # (none past 48; 8 past 16 or 32 at 24 and 40; 9, 10, 13 rows with no block; 14 at 46; 15 at 31 and 47), and 6-row
    # tiles run with every remainder 1..5 (H, 2F, F and the row counts). The forward without autograd (the activation
    # read with the pre-activation's row stride) gives the training forward's bits.
    rows = [SMALL_MAX_ROWS + 1, 10, 13, 24, 31, 40, 46, 47, MID_MAX_ROWS, MID_MAX_ROWS + 1]
    inputs = routed_inputs(rows, H, F, dtype, seed=7)
    y = check_all(inputs)
    with torch.no_grad():
        assert torch.equal(h3fusion_ext.moe_ffn(*inputs), y)


@pytest.mark.parametrize(
    "H,F",
    [
        (55, 26),  # 55 = 9 x 6 + 1 and 52 = 8 x 6 + 4 weight rows: threads split whole 6-row tiles, the last one short
        (160, 72),  # K 160 and 72: whole 8-lane steps; 144 weight rows split evenly
        (37, 13),  # K tails of 5 (H) and 5 (F) past the last 8-lane step
    ],
)
def test_fp32_forward_above_48_rows_on_the_threaded_tile(H, F):
    # fp32 forward projections above kMidGemmMaxRows run on large_nt on AVX2 and AMD CPUs (BLAS elsewhere): a's rows
    # in chunks of 128, each on tile_nt (full 16-row blocks, then pairs of rows and a last single one on dot products),
    # the threads splitting the weight's rows. 49: one block short of 64; 130 = 128 + 2 (a second chunk of 2 rows, dot
    # products only); 143 = 128 + 15; 200 = 128 + 72 (4 blocks + 8 rows); 257 = 2 x 128 + 1. The backward stays on
    # BLAS, so all four gradients check the forward's saved pre-activation too. The forward without autograd gives the
    # training forward's bits.
    rows = [MID_MAX_ROWS + 1, 130, 143, 200, 257]
    inputs = routed_inputs(rows, H, F, torch.float32, seed=13)
    y = check_all(inputs)
    with torch.no_grad():
        assert torch.equal(h3fusion_ext.moe_ffn(*inputs), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_shape_with_top_k(dtype):
    # Decode: 4 tokens, top-2 of 8 experts, each expert a couple of rows; routing weights as a gradient leaf too.
    check_all(routed_inputs([1] * 8, 48, 40, dtype, k=2, seed=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_over_weight_rows(dtype):
    # Every expert within 8 rows: the forward splits each expert's weights into 64-column units (few_rows_ffn.h).
    # F 150 = 64 + 64 + 22 (a unit with a 16-lane vector and a 6-column tail), H 130 = 64 + 64 + 2; the forward
    # without autograd (activation written over the pre-activation) gives the training forward's bits.
    inputs = routed_inputs([1, 2, 0, 3, 8, 1, 5, 4], 130, 150, dtype, seed=11)
    y = check_all(inputs)
    with torch.no_grad():
        assert torch.equal(h3fusion_ext.moe_ffn(*inputs), y)


def test_fp32_small_rows_are_tight():
    # fp32 accumulation in a fixed order: within a few ulps of an fp64 computation, not just the tolerance rule.
    inputs = routed_inputs(list(range(1, SMALL_MAX_ROWS + 1)) + [23, 48], 96, 72, torch.float32, seed=5)
    grad_y = torch.randn_like(inputs[0])
    y, grads = run_with_grads(h3fusion_ext.moe_ffn, inputs, grad_y)
    hi = [t.double() if t.is_floating_point() else t for t in inputs]
    ref_y, ref_grads = run_with_grads(reference.moe_ffn, hi, grad_y.double())
    torch.testing.assert_close(y.double(), ref_y, atol=2e-5, rtol=2e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=5e-5)
