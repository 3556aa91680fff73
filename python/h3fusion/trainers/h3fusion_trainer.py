"""H3FusionTrainer: trains a fused MoE's routers and experts with the LM, gating and drift-regularizer losses.

    L = L_LM + λ_gate · L_gate + Σ_i γ_i · R_i (+ λ_bal · L_balance)       (design.md §3, `h3fusion.losses.gating`)

A `transformers.Trainer` subclass, so Accelerate, torchrun, FSDP and DeepSpeed launch it as usual. Only the routers
(`*.mlp.gate.weight`) and the experts (`*.mlp.experts.*`: full weights, or LoRA adapters — our `LoRAExperts` inside
`moe_ffn`, PEFT's under transformers' implementations, design.md §11) train;
attention, norms, embeddings and lm_head are frozen. Each loss term is logged separately (`lm_loss`, `gate_loss`,
`drift_loss`, `balance_loss`). Checkpoints are written into a staging folder and renamed into place, so an
interrupted save never corrupts the last good checkpoint; the fusion-time expert snapshot θ⁽⁰⁾ is saved with each
checkpoint and restored on resume.

It runs on the h3fusion_ext kernels by default: every MoE block routes with `topk_route` and runs its experts with
`moe_ffn` (`experts_implementation="h3fusion"`; "grouped_mm" / "eager" choose transformers' own), and the LM loss
comes from `linear_logprob` on the final hidden states and the lm_head weight, never from `[B, S, V]` logits.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.instructions import expert_names_from_config
from ..losses.gating import (
    canonical_param_name,
    drift_regularization,
    expert_reference_state,
    gating_loss,
    load_balancing_loss,
)
from ..losses.lm import causal_lm_loss, lm_loss_from_hidden
from ..losses.sharded_drift import full_reference_state, shard_reference_state
from ..models.hf_experts import IMPLEMENTATION, current_experts_implementation, set_experts_implementation
from ..models.lora_adapter_io import ADAPTER_WEIGHTS, load_lora_adapter, save_lora_adapter
from ..models.lora_experts import add_lora_experts, is_lora_factor, lora_experts_modules
from ..models.shared_format import SHARED_WEIGHTS, load_shared_state, write_shared_model
from .checkpoint import clean_stale_staging, publish_staged_dir, staging_dir_for
from .sequence_logprobs import _lm_head_weight

__all__ = ["H3FusionTrainer", "causal_lm_loss", "is_trainable_h3fusion_param", "prepare_h3fusion_model"]

REFERENCE_FILE = "h3fusion_reference.safetensors"
_ROUTER_RE = re.compile(r"(?:^|\.)mlp\.gate\.weight$")
_EXPERT_RE = re.compile(r"(?:^|\.)mlp\.experts\.")


def is_trainable_h3fusion_param(name: str) -> bool:
    """True for router weights and expert weights (incl. their LoRA factors), by canonical parameter name."""
    key = canonical_param_name(name)
    return bool(_ROUTER_RE.search(key) or _EXPERT_RE.search(key))


def _set_top_k(model: torch.nn.Module, top_k: int) -> None:
    config = getattr(model, "config", None)
    num_experts = getattr(config, "num_local_experts", None)
    if num_experts is not None and not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if config is not None:
        config.num_experts_per_tok = int(top_k)
    for module in model.modules():
        # MixtralSparseMoeBlock and MixtralTopKRouter both keep their own copy of top_k
        if hasattr(module, "top_k") and (hasattr(module, "experts") or hasattr(module, "num_experts")):
            module.top_k = int(top_k)


def prepare_h3fusion_model(
    model: torch.nn.Module,
    *,
    top_k: int | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    experts_implementation: str | None = IMPLEMENTATION,
) -> torch.nn.Module:
    """Freezes everything but routers and experts; optionally LoRA-adapts the experts.

    With `lora_rank` and experts_implementation="h3fusion" (the default), every MoE block's experts become
    `LoRAExperts` on the same base weights (frozen): the adapters run inside `h3fusion_ext.moe_ffn(..., lora=...)`,
    never forming W + BA; the routers are trained in full. `h3fusion.models.lora_adapter_io.save_lora_adapter`
    writes them as a PEFT adapter, `merge_lora_experts` folds them in. With "grouped_mm" / "eager", the 3-D expert
    weights get PEFT LoRA adapters (`target_parameters`, routers in `modules_to_save`) instead.
    A model that already has `LoRAExperts` (a shared-base fusion, `h3fusion.load_fused_model`) trains its adapters
    and routers, the base frozen.

    Args:
        model: a fused MoE causal LM (e.g. `MixtralForCausalLM` from `fuse_models`).
        top_k: experts per token (None keeps the config's).
        lora_rank: LoRA rank for the experts (None: train full expert weights).
        lora_alpha: LoRA alpha (default 2 × rank).
        experts_implementation: "h3fusion" (routers on `topk_route`, experts on `moe_ffn`), "grouped_mm" or
            "eager" (transformers' own); None leaves the model's as it is.

    Returns:
        the model to train (a `peft.PeftModel` on the PEFT path).

    Raises:
        ValueError: `lora_rank` / `lora_alpha` that differ from the LoRA experts the model already has.
    """
    if top_k is not None:
        _set_top_k(model, top_k)
    existing = lora_experts_modules(model)
    ours = experts_implementation == IMPLEMENTATION or (
        experts_implementation is None and current_experts_implementation(model) == IMPLEMENTATION
    )
    m = existing[0][1] if existing else None
    if m is not None and lora_rank and (int(lora_rank) != m.rank or lora_alpha not in (None, m.lora_alpha)):
        raise ValueError(
            f"the model already has LoRA experts (rank {m.rank}, alpha {m.lora_alpha}); lora_rank={lora_rank}, "
            f"lora_alpha={lora_alpha} would change them"
        )
    if lora_rank and ours and not existing:
        add_lora_experts(model, int(lora_rank), lora_alpha)
        existing = lora_experts_modules(model)
    if experts_implementation is not None:
        set_experts_implementation(model, experts_implementation)
    if existing:  # adapters and routers train; the base experts and everything else stay frozen
        for name, p in model.named_parameters():
            key = canonical_param_name(name)
            p.requires_grad_(bool(_ROUTER_RE.search(key)) or (bool(_EXPERT_RE.search(key)) and is_lora_factor(key)))
        return model
    if lora_rank:
        import peft

        targets = sorted(
            {
                canonical_param_name(n).split(".mlp.experts.")[-1]
                for n, _ in model.named_parameters()
                if _EXPERT_RE.search(canonical_param_name(n))
            }
        )
        cfg = peft.LoraConfig(
            r=int(lora_rank),
            lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank),
            target_modules=[],
            target_parameters=[f"mlp.experts.{t}" for t in targets],
            modules_to_save=["gate"],
        )
        model = peft.get_peft_model(model, cfg)
        for name, p in model.named_parameters():
            key = canonical_param_name(name)
            p.requires_grad_("lora_" in key or ("modules_to_save" in key and ".mlp.gate." in key))
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable_h3fusion_param(name))
    return model


class H3FusionTrainer(Trainer):
    """`transformers.Trainer` for H3Fusion alignment fusion.

    Batches must hold input_ids / attention_mask / labels [B, S] (labels -100 on prompt and padding) and
    category_labels [B] (expert indices; see `h3fusion.data.InstructionDataset`).

    Args:
        model: the fused MoE (bare, or already prepared). It is prepared with `prepare_h3fusion_model`
            (freezing, optional LoRA, top-k) unless `prepare=False`.
        args: TrainingArguments (`remove_unused_columns` is forced off: category_labels must reach the loss).
        lambda_gate: weight of the gating loss (paper ≈ 0.01).
        gammas: one drift weight γ_i per expert (a float applies to all; None or 0 disables the regularizer).
        lambda_balance: weight of the Switch load-balancing loss (0 = off). The model's own
            `router_aux_loss_coef` is set to it too; the model's aux loss is never added twice (labels are not
            passed to the model, the trainer computes every term itself).
        squared_drift: use ‖ΔW‖² in the drift term.
        top_k, lora_rank, lora_alpha: see `prepare_h3fusion_model`.
        experts_implementation: what runs the MoE blocks: "h3fusion" (default: `topk_route` + `moe_ffn`),
            "grouped_mm" or "eager" (transformers' own); None keeps the model's. Applied with `prepare=False` too.
            The implementation in use is `self.experts_implementation`.
        expert_names: category names in expert order (default: from the model config); stored for reports.
        **kwargs: passed to `transformers.Trainer` (train_dataset, data_collator, callbacks, ...).
    """

    # compute_loss returns a per-batch mean: let Trainer divide by the gradient-accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments | None = None,
        *,
        lambda_gate: float = 0.01,
        gammas: float | Sequence[float] | None = None,
        lambda_balance: float = 0.0,
        squared_drift: bool = False,
        top_k: int | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        expert_names: Sequence[str] | None = None,
        prepare: bool = True,
        experts_implementation: str | None = IMPLEMENTATION,
        **kwargs: Any,
    ):
        config = model.config
        num_experts = int(config.num_local_experts)
        if expert_names is None:
            try:
                expert_names = expert_names_from_config(config)
            except ValueError:
                expert_names = [f"expert_{i}" for i in range(num_experts)]
        if len(expert_names) != num_experts:
            raise ValueError(f"expert_names has {len(expert_names)} names for {num_experts} experts")
        self.expert_names = list(expert_names)
        if lambda_gate < 0 or lambda_balance < 0:
            raise ValueError("lambda_gate and lambda_balance must be non-negative")
        if gammas is None:
            gammas = [0.0] * num_experts
        elif isinstance(gammas, (int, float)):
            gammas = [float(gammas)] * num_experts
        gammas = [float(g) for g in gammas]
        if len(gammas) != num_experts or any(g < 0 for g in gammas):
            raise ValueError(f"gammas must be {num_experts} non-negative numbers (one per expert), got {gammas}")
        self.lambda_gate = float(lambda_gate)
        self.gammas = gammas
        self.lambda_balance = float(lambda_balance)
        self.squared_drift = bool(squared_drift)
        config.router_aux_loss_coef = self.lambda_balance
        # θ⁽⁰⁾: the expert weights at fusion time, a detached snapshot (never a trainable parameter)
        self.reference_state = expert_reference_state(model) if any(g > 0 for g in gammas) else {}
        if args is None:
            args = TrainingArguments(output_dir="h3fusion-train", report_to=[])
        if prepare:
            if lora_rank:
                # LoRA factors are initialised randomly: seed first so a run (and its resume) is reproducible
                from transformers import set_seed

                set_seed(args.seed)
            model = prepare_h3fusion_model(
                model,
                top_k=top_k,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                experts_implementation=experts_implementation,
            )
        else:
            if top_k is not None:
                _set_top_k(model, top_k)
            if experts_implementation is not None:
                set_experts_implementation(model, experts_implementation)
        self.experts_implementation = current_experts_implementation(model)
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kwargs)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._staging_root: str | None = None
        if self.args.should_save:
            clean_stale_staging(self.args.output_dir)
        if self.reference_state and self.is_deepspeed_enabled:
            # FSDP2 is handled (sharded drift, design.md §9); ZeRO-3 parameters are empty placeholders outside forward
            stage = getattr(getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0)
            if stage == 3:
                raise ValueError(
                    "the drift regularizer (gammas > 0) is not supported with DeepSpeed ZeRO-3 parameter sharding; "
                    "use FSDP2, DDP or ZeRO-1/2, or set gammas=0"
                )

    def _params_sharded(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: parameters are whole only inside their module's forward."""
        stage = getattr(getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0)
        return bool(self.is_fsdp_enabled or (self.is_deepspeed_enabled and stage == 3))

    # ------------------------------------------------------------------------------------------------------------
    # loss

    def _reference_on_device(self) -> dict[str, torch.Tensor]:
        # move θ⁽⁰⁾ next to the parameters once (the model may have been moved after __init__)
        if self.reference_state:  # under FSDP2, also re-held in the parameters' sharding (design.md §9)
            shard_reference_state(self.model, self.reference_state, canonical_param_name)
        return self.reference_state

    @staticmethod
    def _forward_hidden(model, inputs):
        """The model's forward with router logits and hidden states but no logits (`logits_to_keep` selects no
        position, so the lm_head projects nothing). The whole wrapped model runs, not just its decoder, so DDP /
        DeepSpeed see a normal forward and synchronise gradients."""
        no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        kwargs = dict(inputs, output_router_logits=True, output_hidden_states=True, use_cache=False, return_dict=True)
        try:
            return model(**kwargs, logits_to_keep=no_positions)
        except TypeError as exc:
            if "logits_to_keep" not in str(exc):
                raise
            return model(**kwargs)  # a model without logits_to_keep computes its logits; they are not used

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        categories = inputs.pop("category_labels", None)
        if categories is None and self.lambda_gate > 0:
            raise ValueError("the batch has no `category_labels`; the gating loss needs one category per example")
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs["input_ids"])
            inputs["attention_mask"] = attention_mask
        if self._params_sharded():
            # the lm_head weight is gathered only inside the model's forward: take the logits path there
            outputs = model(**inputs, output_router_logits=True, use_cache=False)
            lm = causal_lm_loss(outputs.logits, labels)
        else:
            outputs = self._forward_hidden(model, inputs)
            lm = lm_loss_from_hidden(outputs.hidden_states[-1], _lm_head_weight(model), labels)
        terms = {"lm_loss": lm}
        loss = lm
        router_logits = outputs.router_logits
        if self.lambda_gate > 0:
            gate = gating_loss(router_logits, attention_mask, categories)
            terms["gate_loss"] = gate
            loss = loss + self.lambda_gate * gate
        if self.lambda_balance > 0:
            top_k = int(self.accelerator.unwrap_model(model).config.num_experts_per_tok)
            bal = load_balancing_loss(router_logits, attention_mask, top_k)
            terms["balance_loss"] = bal
            loss = loss + self.lambda_balance * bal
        if self.reference_state:
            drift = drift_regularization(
                self.accelerator.unwrap_model(model), self._reference_on_device(), self.gammas, self.squared_drift
            )
            terms["drift_loss"] = drift
            loss = loss + drift.to(loss.device)
        if model.training:
            for k, v in terms.items():
                v = v.detach().float()
                self._term_sums[k] = self._term_sums[k] + v if k in self._term_sums else v
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count > 0:
            keys = sorted(self._term_sums)
            stacked = torch.stack([self._term_sums[k] for k in keys]) / self._term_count
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            for k, v in zip(keys, stacked.tolist(), strict=True):
                logs[k] = round(v, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    # ------------------------------------------------------------------------------------------------------------
    # atomic checkpoints

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir_for(run_dir, name)
        os.makedirs(staging, exist_ok=True)
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)  # writes <staging>/<name>, rotates nothing real
        finally:
            self._staging_root = None
        staged = os.path.join(staging, name)
        reference = full_reference_state(self.reference_state)  # every rank: gathers a sharded θ⁽⁰⁾
        if self.args.should_save and reference:
            from safetensors.torch import save_file

            save_file(reference, os.path.join(staged, REFERENCE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            publish_staged_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # older transformers 5.x keep it as a method
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            return
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Models with our `LoRAExperts` save what trains: a PEFT adapter (LoRA factors + routers) on per-expert
        bases, the shared-base format (design.md §11) on a shared base. Anything else: `Trainer._save`."""
        target = self.accelerator.unwrap_model(self.model)
        modules = lora_experts_modules(target)
        if not modules:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if modules[0][1].shared_base:
            write_shared_model(target, output_dir)
        else:
            save_lora_adapter(target, output_dir, base_model_name_or_path=getattr(target, "name_or_path", None))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if lora_experts_modules(target):
            self._load_lora_experts_checkpoint(target, resume_from_checkpoint)
            return
        has_full_weights = any(
            os.path.isfile(os.path.join(resume_from_checkpoint, f))
            for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if (
            isinstance(target, PreTrainedModel)
            and has_full_weights
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        ):
            # Trainer's loader reads the raw state dict, but transformers 5 saves MoE checkpoints in the
            # hub layout (`block_sparse_moe.experts.N.w1` for Mixtral) and converts only in from_pretrained:
            # the expert and router weights would silently not be restored. Load through from_pretrained.
            loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
            target.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, REFERENCE_FILE)
        if os.path.exists(path):
            from safetensors.torch import load_file

            loaded = load_file(path)
            if set(loaded) != set(self.reference_state) and self.reference_state:
                raise ValueError(f"{path} holds other expert weights than this model's")
            self.reference_state = dict(loaded)

    def _load_lora_experts_checkpoint(self, target, checkpoint: str) -> None:
        """Restore a `_save` of a model with `LoRAExperts` (adapter or shared-base files) and θ⁽⁰⁾."""
        if os.path.isfile(os.path.join(checkpoint, ADAPTER_WEIGHTS)):
            load_lora_adapter(target, checkpoint)
        elif os.path.isfile(os.path.join(checkpoint, SHARED_WEIGHTS)):
            load_shared_state(target, checkpoint)
        else:
            raise ValueError(f"{checkpoint}: no {ADAPTER_WEIGHTS} or {SHARED_WEIGHTS} for this model's LoRA experts")
        path = os.path.join(checkpoint, REFERENCE_FILE)
        if os.path.exists(path):
            from safetensors.torch import load_file

            self.reference_state = dict(load_file(path))
