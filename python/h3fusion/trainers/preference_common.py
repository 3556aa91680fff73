"""Shared pieces of the FuseSFT / FusePO trainers: the list dataset, the batch collator, per-step metrics, the
dataset checks (not empty; weights normalised over the dataset).

The collator tokenises on the fly (`encode_example`), so datasets are plain item dicts from `h3fusion.data`:
SFT items, pair items or group items. Every batch it builds is a dict of tensors, which the default
`transformers.Trainer` machinery (device placement, accelerate, torchrun) handles unchanged. The row layout of pair
batches and the reference fields come from `h3fusion.data.pair_layout`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from ..data.pair_layout import GROUP_REF_FIELD, REF_BATCH_KEY, REF_ITEM_FIELD, pair_fields
from ..data.tokens import pad_token_id
from .sequence_logprobs import collate_examples, encode_example

__all__ = ["ItemDataset", "PreferenceCollator", "PreferenceTrainerMixin", "check_dataset"]

# |mean weight - 1| above this draws a warning: the weights were not normalised over this dataset.
_WEIGHT_MEAN_TOLERANCE = 1e-3


class ItemDataset(torch.utils.data.Dataset):
    """A list of item dicts as a map-style dataset."""

    def __init__(self, items: Sequence[dict]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def as_dataset(data: Any) -> Any:
    """Lists become `ItemDataset`; torch / Hugging Face datasets pass through."""
    if data is None or isinstance(data, torch.utils.data.Dataset) or hasattr(data, "column_names"):
        return data
    if isinstance(data, dict):  # eval_dataset may be a dict of datasets
        return {k: as_dataset(v) for k, v in data.items()}
    return ItemDataset(list(data))


def _weights_of(dataset: Any) -> list[float]:
    """Every item's weight ("weight", 1 when absent; the "weights" of group items), from a list or a dataset."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # a Hugging Face dataset: read the columns, not the rows
        if "weights" in columns:
            return [float(w) for ws in dataset["weights"] for w in ws]
        return [float(w) for w in dataset["weight"]] if "weight" in columns else [1.0] * len(dataset)
    out: list[float] = []
    for i in range(len(dataset)):
        it = dataset[i]
        out += [float(w) for w in it["weights"]] if "weights" in it else [float(it.get("weight", 1.0))]
    return out


def check_dataset(dataset: Any, name: str) -> None:
    """Refuse an empty dataset; warn when its weights are not normalised over it (mean weight not 1).

    The losses take the plain batch mean of w * l, so a mean weight m scales every step by m (like the learning
    rate): `h3fusion.data.normalize_weights` rescales a list, e.g. after a train / eval split.

    Raises:
        ValueError: the dataset has no items, or a weight is negative or not finite.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return  # an iterable (streamed) dataset cannot be checked up front
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: no items to train or evaluate on (check the data file and the filters)")
    weights = _weights_of(dataset)
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"{name}: weights must be finite and >= 0, got {bad[0]!r}")
    mean = math.fsum(weights) / len(weights)
    if abs(mean - 1.0) > _WEIGHT_MEAN_TOLERANCE:
        warnings.warn(
            f"{name}: the mean weight is {mean:.6g}, not 1; the losses average w * l per batch, so weights should "
            "be normalised over the dataset (h3fusion.data.normalize_weights)",
            stacklevel=3,
        )


class PreferenceCollator:
    """Turns item dicts into one padded batch.

    kind="sft":   rows = the items' responses;                         + weights [B]
    kind="pair":  rows = chosen (P), rejected (P)[, target_chosen (P)]; + weights [P], ref_*_logps [P] when present
                  (the row layout of `h3fusion.data.pair_layout`)
    kind="group": rows = every response of every group;                 + rewards, weights, group_ids [N], ref_logps

    Args:
        tokenizer: the Hugging Face tokenizer.
        kind: "sft", "pair" or "group".
        encode_kwargs: keyword arguments of `encode_example` (max_length, max_prompt_length, chat_template).
        with_target: pair batches also carry the target-chosen rows (WRPO); items must have "target_chosen".
    """

    def __init__(self, tokenizer: Any, kind: str, encode_kwargs: dict | None = None, with_target: bool = False):
        if kind not in ("sft", "pair", "group"):
            raise ValueError(f"kind must be 'sft', 'pair' or 'group', got {kind!r}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.encode_kwargs = dict(encode_kwargs or {})
        self.with_target = with_target
        self.pad_token_id = pad_token_id(tokenizer)

    def _encode(self, prompt: str, response: str) -> dict:
        return encode_example(self.tokenizer, prompt, response, **self.encode_kwargs)

    @staticmethod
    def _floats(items: Sequence[dict], key: str, default: float | None = None) -> torch.Tensor | None:
        if default is None and not all(key in it for it in items):
            return None
        return torch.tensor([float(it.get(key, default)) for it in items], dtype=torch.float32)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("empty batch")
        if self.kind == "sft":
            batch = collate_examples([self._encode(it["prompt"], it["response"]) for it in items], self.pad_token_id)
            batch["weights"] = self._floats(items, "weight", 1.0)
            return batch
        if self.kind == "pair":
            fields = pair_fields(self.with_target)
            for i, it in enumerate(items):
                missing = [f for f in fields if f not in it]
                if missing:
                    raise ValueError(
                        f"pair item {i} lacks {missing} (WRPO pairs come from build_pairs(target_source=...))"
                    )
            enc = [self._encode(it["prompt"], it[f]) for f in fields for it in items]
            batch = collate_examples(enc, self.pad_token_id)
            batch["weights"] = self._floats(items, "weight", 1.0)
            for f in fields:
                ref = self._floats(items, REF_ITEM_FIELD[f])
                if ref is not None:
                    batch[REF_BATCH_KEY[f]] = ref
            return batch
        enc, rewards, weights, groups, refs = [], [], [], [], []
        have_ref = all(GROUP_REF_FIELD in it for it in items)
        for g, it in enumerate(items):
            k = len(it["responses"])
            if len(it["rewards"]) != k:
                raise ValueError(f"group item {g}: {k} responses but {len(it['rewards'])} rewards")
            enc += [self._encode(it["prompt"], r) for r in it["responses"]]
            rewards += [float(r) for r in it["rewards"]]
            weights += [float(w) for w in it.get("weights", [1.0] * k)]
            groups += [g] * k
            if have_ref:
                refs += [float(v) for v in it[GROUP_REF_FIELD]]
        batch = collate_examples(enc, self.pad_token_id)
        batch["rewards"] = torch.tensor(rewards, dtype=torch.float32)
        batch["weights"] = torch.tensor(weights, dtype=torch.float32)
        batch["group_ids"] = torch.tensor(groups, dtype=torch.long)
        if have_ref:
            batch[GROUP_REF_FIELD] = torch.tensor(refs, dtype=torch.float32)
        return batch


class PreferenceTrainerMixin:
    """Metric accumulation (averaged into each `log` call) and loss-only evaluation for our Trainer subclasses."""

    def _setup_preference(self) -> None:
        # Our compute_loss returns a per-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._pref_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        # transformers' num_items_in_batch, counted in OUR items: one weight per loss term (an SFT response, a pair,
        # an RLOO response), summed over the accumulation micro-batches and over all ranks (design.md §9).
        if not batch_samples or any("weights" not in b for b in batch_samples):
            return None
        n = torch.tensor(sum(int(b["weights"].shape[0]) for b in batch_samples), device=device)
        return self.accelerator.gather(n).sum() if self.args.world_size > 1 else n

    def _global_item_mean(self, batch_mean: torch.Tensor, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """Turn this micro-batch's item mean into its share of the GLOBAL item mean over ranks and accumulation
        steps: Σ_local w·ℓ / N_global, times the rank count because DDP/FSDP average gradients over ranks. The
        Trainer then neither divides by the accumulation steps nor weights ranks by their batch size. Unchanged (the
        plain batch mean) when no count is given (evaluation, or a batch without weights)."""
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is None:
            return batch_mean
        n_local = inputs["weights"].shape[0]
        return batch_mean * (n_local * self.accelerator.num_processes) / num_items_in_batch

    def _record(self, metrics: dict[str, float | torch.Tensor]) -> None:
        split = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._pref_metrics[split][k].append(float(v.detach().float().mean()) if torch.is_tensor(v) else float(v))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        stored = self._pref_metrics[split]
        logs = {**logs, **{prefix + k: sum(v) / len(v) for k, v in stored.items() if v}}
        stored.clear()
        return super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def training_args_for_preference(args: transformers.TrainingArguments | None, output_dir: str = "h3fusion_out"):
    """Default arguments, and `remove_unused_columns=False` (our columns are not model.forward arguments)."""
    if args is None:
        args = transformers.TrainingArguments(output_dir=output_dir, report_to="none")
    args.remove_unused_columns = False
    return args
