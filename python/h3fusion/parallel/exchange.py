"""Differentiable token-row exchange between the ranks of a process group (`all_to_all_single`).

Expert parallelism (design.md §9) moves each token's rows to the ranks that own its experts and the outputs back.
Both moves are one `all_to_all_single` with per-rank row counts; the backward of a move is the same collective with
the send and receive counts swapped (the gradient rows travel back the way the rows came).

gloo (CPU) and NCCL (GPU) both implement `all_to_all_single` with uneven splits in the torch this project pins
(checked on torch 2.14 / gloo), so there is one code path and no point-to-point fallback.

Every rank of the group must call these functions the same number of times in the same order, and the backward
passes must line up too: on every rank the exchanged rows either require grad or do not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Tell every rank how many rows it will receive from each rank.

    Args:
        send_counts: [W] int64, rows this rank sends to rank r of the group.
        group: the process group (None: the default group).

    Returns:
        [W] int64, rows this rank receives from rank r.
    """
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


class _AllToAllRows(torch.autograd.Function):
    """rows[sum(send_splits), ...] -> [sum(recv_splits), ...]; backward: the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, rows, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_rows = grad_out.new_empty((sum(ctx.send_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_rows, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_rows, None, None, None


def all_to_all_rows(
    rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send rows[sum(send_splits), ...] (grouped by destination rank, in rank order) and receive the rows sent here.

    Args:
        rows: [S, ...] rows ordered by destination rank; the first send_splits[0] go to rank 0 of the group, etc.
        recv_splits: rows received from each rank (from `exchange_counts`).
        send_splits: rows sent to each rank, sum = S.
        group: the process group (None: the default group).

    Returns:
        [sum(recv_splits), ...] rows ordered by source rank, each source's rows in the order it sent them.
        Differentiable w.r.t. `rows` when it requires grad (integer rows are exchanged without autograd).
    """
    if rows.requires_grad:
        return _AllToAllRows.apply(rows, recv_splits, send_splits, group)
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
    return out
