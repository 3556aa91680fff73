"""FuseSFTTrainer: reward-weighted supervised fine-tuning on multi-source responses (FuseRL's FuseSFT)."""

from __future__ import annotations

from typing import Any

import transformers

from ..data.tokens import IGNORE_INDEX
from ..losses.preference import weighted_sft_loss
from .preference_common import (
    PreferenceCollator,
    PreferenceTrainerMixin,
    as_dataset,
    check_dataset,
    training_args_for_preference,
)
from .sequence_logprobs import sequence_logprobs

__all__ = ["FuseSFTTrainer"]


class FuseSFTTrainer(PreferenceTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` for FuseSFT: L = -(1/B) sum_j w_j mean_t log pi(y_jt | x, y_j<t) over a batch of B.

    Datasets hold SFT items {prompt, response, weight} (`h3fusion.data.sft_examples`) whose weights are normalised
    over the dataset (mean 1; a warning says when they are not), so the batch loss is an unbiased estimate of the
    full objective at any batch size. Token log-probs come from the model's last hidden states and lm_head through
    `h3fusion_ext.linear_logprob`, never from full logits.
    Logged per step: the loss, sft/weight (mean weight), sft/logp_per_token, sft/tokens.

    Args:
        model: a transformers causal LM.
        args: TrainingArguments (`remove_unused_columns` is forced to False).
        train_dataset, eval_dataset: lists of SFT items or datasets of them.
        processing_class: the tokenizer (required).
        reduction: "token_mean" or "sum" (see `weighted_sft_loss`).
        max_length, max_prompt_length, chat_template: tokenisation (see `encode_example`).
        **kwargs: other `transformers.Trainer` arguments (callbacks, optimizers, ...).
    """

    def __init__(
        self,
        model: Any,
        args: transformers.TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        reduction: str = "token_mean",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        chat_template: bool = False,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        if reduction not in ("token_mean", "sum"):
            raise ValueError(f"reduction must be 'token_mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        check_dataset(train_dataset, "train_dataset")
        for sub, part in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
            check_dataset(part, "eval_dataset" + (f"[{sub!r}]" if sub else ""))
        encode = {"max_length": max_length, "max_prompt_length": max_prompt_length, "chat_template": chat_template}
        super().__init__(
            model=model,
            args=training_args_for_preference(args),
            data_collator=data_collator or PreferenceCollator(processing_class, "sft", encode),
            train_dataset=as_dataset(train_dataset),
            eval_dataset=as_dataset(eval_dataset),
            processing_class=processing_class,
            **kwargs,
        )
        self._setup_preference()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], per_token=True)
        mask = inputs["labels"][:, 1:] != IGNORE_INDEX
        weights = inputs.get("weights")
        loss = weighted_sft_loss(out.token_logps, mask, weights, reduction=self.reduction)
        loss = self._global_item_mean(loss, inputs, num_items_in_batch)
        lengths = out.lengths.clamp_min(1).float()
        self._record(
            {
                "sft/logp_per_token": (out.logps.detach() / lengths).mean(),
                "sft/weight": weights.mean() if weights is not None else 1.0,
                "sft/tokens": out.lengths.float().sum(),
            }
        )
        return (loss, {"logps": out.logps.detach()}) if return_outputs else loss
