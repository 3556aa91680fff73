"""Reward-weighted preference-fusion losses (FuseRL / FuseChat-3.0 style): FuseSFT, weighted DPO, SimPO, WRPO, RLOO.

Every loss takes per-sequence (or per-token) log-probs computed elsewhere — in this project by
`h3fusion.trainers.sequence_logprobs`, which never materialises the [tokens, vocab] logits. Every weighted loss
reduces its per-example losses l_p with weights w_p to the plain batch mean

    L = (1/B) sum_p w_p * l_p        (B = examples in the batch),

where the weights were normalised over the whole dataset beforehand (`h3fusion.data.preference`: mean weight 1
over all items). So `weights=None` (or all ones) gives the plain mean, a weight means the same at every batch size,
and the mean of the minibatch losses over an epoch of equal batches is the full objective (1/N) sum_p w_p l_p —
its gradient too. (A per-batch sum w l / sum w would cancel the weight of a batch of one.) Weights are data: never
differentiated, >= 0; a zero weight simply contributes nothing.

The pair losses return a `PreferenceLossOutput` (loss, chosen_rewards, rejected_rewards) — like TRL's losses —
so logged reward metrics come from the very expression the loss uses; WRPO adds the source- and target-chosen
rewards (`WRPOLossOutput`), RLOO returns its advantages (`RLOOLossOutput`). `weighted_sft_loss` returns the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "PreferenceLossOutput",
    "RLOOLossOutput",
    "WRPOLossOutput",
    "rloo_advantages",
    "rloo_loss",
    "simpo_loss",
    "weighted_dpo_loss",
    "weighted_sft_loss",
    "wrpo_alpha",
    "wrpo_loss",
]


def _check_vec(name: str, t: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [P], got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries like the first argument, got {t.shape[0]}")


class PreferenceLossOutput(NamedTuple):
    """A pair loss and the implicit rewards it compares (TRL's (loss, chosen_rewards, rejected_rewards)).

    loss: scalar tensor, differentiable.
    chosen_rewards, rejected_rewards: [P] detached, dtype of the policy log-probs; the loss of pair p is
        -log sigmoid(chosen_rewards[p] - rejected_rewards[p]) (SimPO: minus its margin gamma).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class WRPOLossOutput(NamedTuple):
    """`PreferenceLossOutput` of WRPO plus the two chosen rewards it fuses.

    chosen_rewards = alpha * source_chosen_rewards + (1 - alpha) * target_chosen_rewards (all [P], detached).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    source_chosen_rewards: torch.Tensor
    target_chosen_rewards: torch.Tensor


class RLOOLossOutput(NamedTuple):
    """RLOO loss and its leave-one-out advantages ([N], detached, dtype of seq_logps)."""

    loss: torch.Tensor
    advantages: torch.Tensor


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(1/B) sum_p w_p l_p (plain mean when weights is None); an empty batch gives 0 with a graph."""
    if losses.numel() == 0:
        return losses.sum()
    if weights is None:
        return losses.mean()
    _check_vec("weights", weights, losses.shape[0])
    w = weights.detach().to(device=losses.device, dtype=losses.dtype)
    if not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("weights must be finite and non-negative")
    return (w * losses).mean()


def _as_lengths(name: str, lengths: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    _check_vec(name, lengths, n)
    lengths = lengths.to(device=like.device, dtype=like.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be positive (a response with no tokens has no normalised log-prob)")
    return lengths


def weighted_sft_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "token_mean",
) -> torch.Tensor:
    """FuseSFT: reward-weighted negative log-likelihood (FuseRL, Zhong et al. 2025; FuseChat-3.0, Yang et al. 2025).

        l_j = -(1/|y_j|) sum_t m_jt log pi(y_jt | x, y_j<t)     (reduction="token_mean")
        l_j = -sum_t m_jt log pi(y_jt | x, y_j<t)              (reduction="sum")
        L   = (1/N) sum_j w_j l_j                              (N = responses in the batch)

    where typically w_j = softmax(r_j / tau) over the top-k responses of a prompt, scaled so that the weights have
    mean 1 over the whole dataset (`h3fusion.data.sft_examples`).

    Args:
        logps: [N, L] float, per-token log-probs of the response tokens.
        mask: [N, L] bool or 0/1, which positions are response tokens.
        weights: [N] float >= 0 or None (unit weights).
        reduction: "token_mean" (mean over each sequence's tokens) or "sum" (summed over its tokens).

    Returns:
        Scalar tensor, same dtype as `logps`.
    """
    if logps.dim() != 2:
        raise ValueError(f"logps must be 2-D [N, L], got shape {tuple(logps.shape)}")
    if mask.shape != logps.shape:
        raise ValueError(f"mask must have the shape of logps {tuple(logps.shape)}, got {tuple(mask.shape)}")
    if reduction not in ("token_mean", "sum"):
        raise ValueError(f"reduction must be 'token_mean' or 'sum', got {reduction!r}")
    m = mask.to(logps.dtype)
    seq = (logps * m).sum(dim=1)
    if reduction == "token_mean":
        seq = seq / m.sum(dim=1).clamp_min(1.0)
    return _weighted_mean(-seq, weights)


def _pair_loss(logits: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, weights):
    """Weighted batch mean of -log sigmoid(logits), with the detached rewards whose difference the logits are."""
    loss = _weighted_mean(-F.logsigmoid(logits), weights)
    return PreferenceLossOutput(loss, chosen_rewards.detach(), rejected_rewards.detach())


def weighted_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Weighted DPO, sigmoid loss (DPO: Rafailov et al. 2023; pair weights: FuseRL / FuseChat-3.0).

        r_w = beta * (lp_theta(y_w) - lp_ref(y_w)) / |y_w|,   r_l = beta * (lp_theta(y_l) - lp_ref(y_l)) / |y_l|
        L   = -(1/P) sum_p w_p log sigmoid(r_w,p - r_l,p)

    The length division is applied only when `chosen_lengths` and `rejected_lengths` are given (length-normalised
    DPO); otherwise |y| = 1 and, with unit weights, this is exactly standard DPO (TRL's sigmoid loss, its rewards
    too).

    Args:
        policy_chosen_logps, policy_rejected_logps: [P] float, summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: [P] float, the same under the reference (no gradient needed).
        beta: inverse temperature of the implicit reward.
        weights: [P] float >= 0 or None (dataset-normalised, see the module docstring).
        chosen_lengths, rejected_lengths: [P] response token counts (both or neither).

    Returns:
        PreferenceLossOutput(loss scalar, chosen_rewards r_w [P], rejected_rewards r_l [P]).
    """
    n = policy_chosen_logps.shape[0] if policy_chosen_logps.dim() == 1 else None
    for name, t in (
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        _check_vec(name, t, n)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths (length-normalised DPO) or neither")
    chosen = policy_chosen_logps - ref_chosen_logps.to(policy_chosen_logps.dtype)
    rejected = policy_rejected_logps - ref_rejected_logps.to(policy_rejected_logps.dtype)
    if chosen_lengths is not None:
        chosen = chosen / _as_lengths("chosen_lengths", chosen_lengths, n, chosen)
        rejected = rejected / _as_lengths("rejected_lengths", rejected_lengths, n, rejected)
    # the logits as standard DPO forms them (beta times the difference), so unit weights reproduce it bit for bit
    return _pair_loss(beta * (chosen - rejected), beta * chosen, beta * rejected, weights)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    weights: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Weighted SimPO, reference-free (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward").

        r_w = beta / |y_w| * lp_theta(y_w),   r_l = beta / |y_l| * lp_theta(y_l)
        L   = -(1/P) sum_p w_p log sigmoid(r_w,p - r_l,p - gamma)

    Args:
        policy_chosen_logps, policy_rejected_logps: [P] float, summed response log-probs under the policy.
        chosen_lengths, rejected_lengths: [P] response token counts (> 0).
        beta: reward scale; gamma: target reward margin (absolute, not gamma/beta).
        weights: [P] float >= 0 or None (dataset-normalised).

    Returns:
        PreferenceLossOutput(loss scalar, chosen_rewards r_w [P], rejected_rewards r_l [P]).
    """
    n = policy_chosen_logps.shape[0] if policy_chosen_logps.dim() == 1 else None
    _check_vec("policy_chosen_logps", policy_chosen_logps, n)
    _check_vec("policy_rejected_logps", policy_rejected_logps, n)
    lc = _as_lengths("chosen_lengths", chosen_lengths, n, policy_chosen_logps)
    lr = _as_lengths("rejected_lengths", rejected_lengths, n, policy_rejected_logps)
    r_w, r_l = beta * policy_chosen_logps / lc, beta * policy_rejected_logps / lr
    return _pair_loss(r_w - r_l - gamma, r_w, r_l, weights)


def wrpo_alpha(step: int, total_steps: int, alpha_max: float) -> float:
    """The WRPO fusion coefficient: alpha ramps linearly from 0 at step 0 to `alpha_max` at `total_steps`.

    Args:
        step: current optimisation step (>= 0).
        total_steps: number of steps of the ramp (<= 0 means no ramp: alpha_max at once).
        alpha_max: final alpha in [0, 1].

    Returns:
        alpha = alpha_max * min(step / total_steps, 1).
    """
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        return float(alpha_max)
    return float(alpha_max) * min(step / total_steps, 1.0)


def wrpo_loss(
    policy_source_chosen: torch.Tensor,
    policy_target_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_source_chosen: torch.Tensor,
    ref_target_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> WRPOLossOutput:
    """WRPO (Yang et al. 2025, "Weighted-Reward Preference Optimization for Implicit Model Fusion").

        r(y) = beta * (lp_theta(y) - lp_ref(y))
        l_p  = -log sigmoid(alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l))
        L    = (1/P) sum_p w_p l_p

    y_ws: the best response from the source models; y_wt: the target model's own best response; y_l: the rejected
    response (how `h3fusion.data.build_pairs(mode="wrpo")` picks them is documented there). alpha comes from
    `wrpo_alpha`, ramping from 0 (plain DPO on the target's own pair) to alpha_max.

    Args:
        policy_*, ref_*: [P] float, summed response log-probs under the policy / the reference.
        beta: inverse temperature; alpha: fusion coefficient in [0, 1].
        weights: [P] float >= 0 or None (an extension of the paper's unweighted mean; dataset-normalised).

    Returns:
        WRPOLossOutput(loss, chosen_rewards = alpha r(y_ws) + (1 - alpha) r(y_wt), rejected_rewards = r(y_l),
        source_chosen_rewards = r(y_ws), target_chosen_rewards = r(y_wt)); rewards [P], detached.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n = policy_source_chosen.shape[0] if policy_source_chosen.dim() == 1 else None
    args = {
        "policy_source_chosen": policy_source_chosen,
        "policy_target_chosen": policy_target_chosen,
        "policy_rejected": policy_rejected,
        "ref_source_chosen": ref_source_chosen,
        "ref_target_chosen": ref_target_chosen,
        "ref_rejected": ref_rejected,
    }
    for name, t in args.items():
        _check_vec(name, t, n)
    dt = policy_source_chosen.dtype
    r_ws = beta * (policy_source_chosen - ref_source_chosen.to(dt))
    r_wt = beta * (policy_target_chosen - ref_target_chosen.to(dt))
    r_l = beta * (policy_rejected - ref_rejected.to(dt))
    r_w = alpha * r_ws + (1.0 - alpha) * r_wt
    fused = _pair_loss(r_w - r_l, r_w, r_l, weights)
    return WRPOLossOutput(*fused, r_ws.detach(), r_wt.detach())


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages A_j = r_j - mean_{i != j, g(i) = g(j)} r_i (0 for a response alone in its group).

    Args:
        rewards: [N] float.
        group_ids: [N] integer, responses to the same prompt share an id (any values, any order).

    Returns:
        [N] advantages, dtype of rewards (float32 if rewards are integer).
    """
    _check_vec("rewards", rewards)
    _check_vec("group_ids", group_ids, rewards.shape[0])
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    r = rewards.detach()
    if not r.dtype.is_floating_point:
        r = r.float()
    _, inv = torch.unique(group_ids.to(r.device), return_inverse=True)
    ngroups = int(inv.max()) + 1 if inv.numel() else 0
    total = torch.zeros(ngroups, dtype=r.dtype, device=r.device).index_add_(0, inv, r)
    count = torch.zeros(ngroups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    k = count[inv]
    # mean of the others = (group sum - r_j) / (K - 1); a singleton group has no baseline, so no signal.
    baseline = (total[inv] - r) / (k - 1).clamp_min(1.0)
    return torch.where(k > 1, r - baseline, torch.zeros_like(r))


def rloo_loss(
    seq_logps: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> RLOOLossOutput:
    """Weighted offline multi-source REINFORCE leave-one-out (RLOO: Ahmadian et al. 2024, "Back to Basics";
    offline multi-source weighting: FuseRL).

    For the K responses of one prompt (one group), from any source models:

        A_j = r_j - mean_{i != j} r_i                     (leave-one-out baseline; 0 when K = 1)
        s_j = lp_theta(y_j) / |y_j|                       (|y_j| = 1 when `lengths` is None)
        l_j = -A_j * s_j + kl_coef * kl_j                 (kl term only when `kl` is given)
        L   = (1/N) sum_j w_j l_j                         (N = responses in the batch)

    The advantages are constants (rewards come with the data); a batch must hold whole groups. `kl` is a
    per-sequence, non-negative divergence estimate from the policy to the reference that carries the gradient; the
    trainer uses kl_j = 0.5 * ((lp_theta(y_j) - lp_ref(y_j)) / |y_j|)^2, which is minimal when the policy matches
    the reference on the data.

    Args:
        seq_logps: [N] float, summed response log-probs under the policy.
        rewards: [N] float, one reward per response.
        group_ids: [N] integer, the prompt each response answers.
        weights: [N] float >= 0 or None (dataset-normalised).
        lengths: [N] response token counts; given => s_j is the token mean.
        kl: [N] float or None, per-sequence KL penalty.
        kl_coef: coefficient of the KL penalty.

    Returns:
        RLOOLossOutput(loss scalar, advantages A [N] detached, dtype of seq_logps).
    """
    _check_vec("seq_logps", seq_logps)
    n = seq_logps.shape[0]
    _check_vec("rewards", rewards, n)
    adv = rloo_advantages(rewards, group_ids).to(device=seq_logps.device, dtype=seq_logps.dtype)
    s = seq_logps
    if lengths is not None:
        s = s / _as_lengths("lengths", lengths, n, seq_logps)
    per = -adv * s
    if kl is not None and kl_coef != 0.0:
        _check_vec("kl", kl, n)
        per = per + kl_coef * kl.to(per.dtype)
    return RLOOLossOutput(_weighted_mean(per, weights), adv)
