"""FusePOTrainer: reward-weighted preference optimisation over multi-source data (FuseRL's FusePO; FuseChat-3.0).

loss="dpo" | "dpo_norm" | "simpo" | "wrpo" train on pair items (`h3fusion.data.build_pairs`); loss="rloo" trains on
group items (`h3fusion.data.rloo_groups`). All sequence log-probs come from the model's last hidden states and
lm_head through `h3fusion_ext.linear_logprob`; the chosen, rejected (and target-chosen) rows of a batch share one
forward.

The reference model (DPO, WRPO, RLOO with kl_coef > 0) is either
  * precomputed (default): the reference's log-probs are computed once before training — with `ref_model`, or with
    the initial policy when `ref_model` is None — cached under `ref_cache_dir`, and carried by the items; or
  * online: pass `ref_model` and `precompute_ref_logps=False`; it runs frozen, without gradients, every step.
Items that already carry reference log-probs (`h3fusion.trainers.precompute_reference_logps`) are used as they are.

Every loss is the plain batch mean of w * l with weights normalised over the dataset (`h3fusion.data`); the logged
rewards are the ones the loss returns (`PreferenceLossOutput`), not a second copy of its formula.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from ..data.pair_layout import GROUP_REF_FIELD, REF_BATCH_KEY, has_pair_refs, pair_fields, split_pair_rows
from ..losses.preference import rloo_loss, simpo_loss, weighted_dpo_loss, wrpo_alpha, wrpo_loss
from .preference_common import (
    PreferenceCollator,
    PreferenceTrainerMixin,
    as_dataset,
    check_dataset,
    training_args_for_preference,
)
from .reference_logps import precompute_reference_logps
from .sequence_logprobs import sequence_logprobs

__all__ = ["FUSE_PO_LOSSES", "FusePOTrainer"]

FUSE_PO_LOSSES = ("dpo", "dpo_norm", "simpo", "wrpo", "rloo")


class FusePOTrainer(PreferenceTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` for weighted DPO / length-normalised DPO / SimPO / WRPO / offline RLOO.

    Logged per step (averaged over the logging interval): the loss; for pair losses rewards/chosen,
    rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, weights/mean (and alpha for
    WRPO, rewards/target_chosen); for RLOO rloo/reward, rloo/advantage_abs, rloo/logp_per_token, weights/mean,
    rloo/kl.

    Args:
        model: a transformers causal LM (the policy).
        ref_model: the frozen reference, or None (reference = the initial policy, precomputed).
        args: TrainingArguments (`remove_unused_columns` is forced to False).
        train_dataset, eval_dataset: lists (or datasets) of pair items, or of group items for loss="rloo".
        processing_class: the tokenizer (required).
        loss: one of "dpo", "dpo_norm", "simpo", "wrpo", "rloo".
        beta: DPO / SimPO / WRPO inverse temperature.
        gamma: SimPO target margin.
        alpha_max: WRPO's final alpha; alpha_steps: steps of its linear ramp from 0 (None: the whole run).
        kl_coef: RLOO's KL-to-reference coefficient (0: no reference needed).
        precompute_ref_logps: True (one pass over the data before training) or False (online ref_model).
        ref_cache_dir: directory of the reference log-prob cache (None: no disk cache).
        max_length, max_prompt_length, chat_template: tokenisation (see `encode_example`).
        **kwargs: other `transformers.Trainer` arguments.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: transformers.TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        loss: str = "dpo",
        beta: float = 0.1,
        gamma: float = 0.5,
        alpha_max: float = 0.5,
        alpha_steps: int | None = None,
        kl_coef: float = 0.0,
        precompute_ref_logps: bool = True,
        ref_cache_dir: str | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        chat_template: bool = False,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if loss not in FUSE_PO_LOSSES:
            raise ValueError(f"loss must be one of {FUSE_PO_LOSSES}, got {loss!r}")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        wrpo_alpha(0, 1, alpha_max)  # validates alpha_max
        self.loss_type, self.beta, self.gamma = loss, float(beta), float(gamma)
        self.alpha_max, self.alpha_steps, self.kl_coef = float(alpha_max), alpha_steps, float(kl_coef)
        self.needs_ref = loss in ("dpo", "dpo_norm", "wrpo") or (loss == "rloo" and kl_coef != 0.0)
        if self.needs_ref and not precompute_ref_logps and ref_model is None:
            raise ValueError("precompute_ref_logps=False needs a ref_model to run online")
        self.encode_kwargs = {"max_length": max_length, "max_prompt_length": max_prompt_length}
        self.encode_kwargs["chat_template"] = chat_template
        kind = "group" if loss == "rloo" else "pair"
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            for sub, part in ds.items() if isinstance(ds, dict) else [("", ds)]:
                check_dataset(part, name + (f"[{sub!r}]" if sub else ""))
                self._check_items(part, name + (f"[{sub!r}]" if sub else ""))
        collator = data_collator or PreferenceCollator(processing_class, kind, self.encode_kwargs, loss == "wrpo")
        super().__init__(
            model=model,
            args=training_args_for_preference(args),
            data_collator=collator,
            train_dataset=as_dataset(train_dataset),
            eval_dataset=as_dataset(eval_dataset),
            processing_class=processing_class,
            **kwargs,
        )
        self._setup_preference()
        self.ref_model = None
        if self.needs_ref and precompute_ref_logps:
            # after super().__init__ the policy sits on the training device; before any step it is the initial policy
            ref = ref_model if ref_model is not None else self.model
            if ref_model is not None:
                ref_model.to(self.args.device)
            self.train_dataset = self._with_ref(self.train_dataset, ref, ref_cache_dir)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_ref(v, ref, ref_cache_dir) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._with_ref(self.eval_dataset, ref, ref_cache_dir)
        elif self.needs_ref:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)

    def _check_items(self, dataset: Any, name: str) -> None:
        if dataset is None:
            return
        if self.loss_type == "rloo":
            required, hint = ["prompt", "responses", "rewards"], "group items come from h3fusion.data.rloo_groups"
        else:
            required = ["prompt", *pair_fields(with_target=self.loss_type == "wrpo")]
            hint = "pair items come from h3fusion.data.build_pairs"
            if self.loss_type == "wrpo":
                hint = "WRPO pairs come from build_pairs(mode='wrpo', target_source=...)"
        columns = getattr(dataset, "column_names", None)
        rows = [(0, dict.fromkeys(columns))] if columns is not None else enumerate(dataset)
        for i, item in rows:
            missing = [k for k in required if k not in item]
            if missing:
                raise ValueError(f"{name}[{i}] lacks {missing} for loss={self.loss_type!r} ({hint})")

    # -- reference -------------------------------------------------------------------------------------------------

    def _has_ref(self, item: dict) -> bool:
        if self.loss_type == "rloo":
            return GROUP_REF_FIELD in item
        return has_pair_refs(item, with_target=self.loss_type == "wrpo")

    def _with_ref(self, dataset: Any, ref: Any, cache_dir: str | None) -> Any:
        if dataset is None or len(dataset) == 0:
            return dataset
        items = [dataset[i] for i in range(len(dataset))]
        if all(self._has_ref(it) for it in items):
            return dataset
        return as_dataset(
            precompute_reference_logps(
                ref,
                self.processing_class,
                items,
                cache_dir=cache_dir,
                batch_size=max(self.args.per_device_eval_batch_size, 1),
                encode_kwargs=self.encode_kwargs,
            )
        )

    def _ref_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs [rows] in the batch's row order: from the items, else from the online ref model."""
        if self.loss_type == "rloo":
            stored = inputs.get(GROUP_REF_FIELD)
        else:
            parts = [inputs.get(REF_BATCH_KEY[f]) for f in pair_fields(self.loss_type == "wrpo")]
            stored = None if any(p is None for p in parts) else torch.cat(parts)
        if stored is not None:
            return stored
        if self.ref_model is None:
            raise RuntimeError("the batch carries no reference log-probs and the trainer has no online ref_model")
        with torch.no_grad():
            out = sequence_logprobs(self.ref_model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        return out.logps

    # -- loss ------------------------------------------------------------------------------------------------------

    def current_alpha(self) -> float:
        """WRPO's alpha at the current global step (linear ramp over alpha_steps, default the whole run)."""
        total = self.alpha_steps if self.alpha_steps is not None else self.state.max_steps
        return wrpo_alpha(self.state.global_step, int(total or 0), self.alpha_max)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        logps, lengths = out.logps, out.lengths.clamp_min(1).float()
        weights = inputs["weights"]
        ref = self._ref_logps(inputs).to(logps) if self.needs_ref else None
        if self.loss_type == "rloo":
            loss = self._rloo(inputs, logps, lengths, weights, ref)
        else:
            loss = self._pairwise(logps, lengths, weights, ref)
        loss = self._global_item_mean(loss, inputs, num_items_in_batch)
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _pairwise(self, logps, lengths, weights, ref):
        wrpo = self.loss_type == "wrpo"
        p = weights.shape[0]
        lp = split_pair_rows(logps, p, wrpo)
        n = split_pair_rows(lengths, p, wrpo)
        rf = split_pair_rows(ref, p, wrpo) if ref is not None else None
        pc, pr = lp["chosen"], lp["rejected"]
        metrics: dict[str, Any] = {"logps/chosen": pc.detach(), "logps/rejected": pr.detach(), "weights/mean": weights}
        if self.loss_type == "simpo":
            out = simpo_loss(pc, pr, n["chosen"], n["rejected"], beta=self.beta, gamma=self.gamma, weights=weights)
        elif wrpo:
            alpha = self.current_alpha()
            out = wrpo_loss(
                pc, lp["target_chosen"], pr, rf["chosen"], rf["target_chosen"], rf["rejected"],
                beta=self.beta, alpha=alpha, weights=weights,
            )  # fmt: skip
            metrics.update(
                {"alpha": alpha, "rewards/target_chosen": out.target_chosen_rewards,
                 "rewards/source_chosen": out.source_chosen_rewards}
            )  # fmt: skip
        else:
            norm = {}
            if self.loss_type == "dpo_norm":
                norm = {"chosen_lengths": n["chosen"], "rejected_lengths": n["rejected"]}
            out = weighted_dpo_loss(pc, pr, rf["chosen"], rf["rejected"], beta=self.beta, weights=weights, **norm)
        rc, rr = out.chosen_rewards, out.rejected_rewards
        metrics.update(
            {
                "rewards/chosen": rc,
                "rewards/rejected": rr,
                "rewards/margins": rc - rr,
                "rewards/accuracies": (rc > rr).float(),
            }
        )
        self._record(metrics)
        return out.loss

    def _rloo(self, inputs, logps, lengths, weights, ref):
        rewards, groups = inputs["rewards"], inputs["group_ids"]
        kl = None
        if ref is not None:
            # a non-negative per-sequence divergence, minimal where the policy matches the reference on the data
            kl = 0.5 * ((logps - ref) / lengths) ** 2
        out = rloo_loss(logps, rewards, groups, weights, lengths=lengths, kl=kl, kl_coef=self.kl_coef)
        metrics = {
            "rloo/reward": rewards,
            "rloo/advantage_abs": out.advantages.abs(),
            "rloo/logp_per_token": logps.detach() / lengths,
            "weights/mean": weights,
        }
        if kl is not None:
            metrics["rloo/kl"] = kl.detach()
        self._record(metrics)
        return out.loss
