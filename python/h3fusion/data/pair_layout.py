"""The layout of preference items and batches: which text fields a pair has, in which row order a batch holds
them, and where each field's reference log-prob is stored. The data builders, the reference precomputation,
the collator and the trainers all read it from here.

A pair item (`h3fusion.data.build_pairs`) holds the texts "chosen", "rejected" and, for WRPO, "target_chosen".
A pair batch stacks the rows of each field in `pair_fields(with_target)` order, P rows per field:

    rows [0, P)      chosen           (y_w, or y_ws for WRPO)
    rows [P, 2P)     rejected         (y_l)
    rows [2P, 3P)    target_chosen    (y_wt, WRPO only)

so one forward serves every row. Reference log-probs ride on the items as `REF_ITEM_FIELD[field]` (one float) and
on batches as `REF_BATCH_KEY[field]` ([P] float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "GROUP_REF_FIELD",
    "PAIR_FIELDS",
    "REF_BATCH_KEY",
    "REF_ITEM_FIELD",
    "SFT_REF_FIELD",
    "has_pair_refs",
    "pair_fields",
    "split_pair_rows",
]

# The text fields of a pair item, in batch row order.
PAIR_FIELDS = ("chosen", "rejected", "target_chosen")
# item field holding the reference model's summed log-prob of each text field
REF_ITEM_FIELD = {f: f"ref_{f}_logp" for f in PAIR_FIELDS}
# batch key holding those log-probs as a [P] tensor
REF_BATCH_KEY = {f: f"ref_{f}_logps" for f in PAIR_FIELDS}
# group items (`rloo_groups`): one reference log-prob per response; SFT items: one per item
GROUP_REF_FIELD = "ref_logps"
SFT_REF_FIELD = "ref_logp"


def pair_fields(with_target: bool) -> tuple[str, ...]:
    """The text fields of a pair batch, in row order: ("chosen", "rejected"[, "target_chosen"])."""
    return PAIR_FIELDS if with_target else PAIR_FIELDS[:2]


def split_pair_rows(rows: torch.Tensor, n_pairs: int, with_target: bool) -> dict[str, torch.Tensor]:
    """Split a per-row tensor of a pair batch into its fields.

    Args:
        rows: [F * P, ...] any dtype, rows in `pair_fields(with_target)` order (F = 2 or 3).
        n_pairs: P.
        with_target: whether the batch carries the target_chosen rows.

    Returns:
        {field: [P, ...] view of `rows`}.
    """
    fields = pair_fields(with_target)
    if rows.shape[0] != len(fields) * n_pairs:
        raise ValueError(
            f"a pair batch of {n_pairs} pairs with fields {fields} has {len(fields) * n_pairs} rows, "
            f"got {rows.shape[0]}"
        )
    return {f: rows[i * n_pairs : (i + 1) * n_pairs] for i, f in enumerate(fields)}


def has_pair_refs(item: Mapping, with_target: bool) -> bool:
    """Whether a pair item already carries the reference log-prob of each of its fields."""
    return all(REF_ITEM_FIELD[f] in item for f in pair_fields(with_target))
