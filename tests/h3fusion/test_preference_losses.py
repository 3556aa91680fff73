"""h3fusion.losses preference losses vs hand-written scalar formulas (python floats, one example at a time), and the
weighted-loss contract: the plain batch mean of w * l, so minibatch gradients average to the full-batch gradient."""

from __future__ import annotations

import math

import pytest
import torch
from h3fusion.losses.preference import (
    rloo_advantages,
    rloo_loss,
    simpo_loss,
    weighted_dpo_loss,
    weighted_sft_loss,
    wrpo_alpha,
    wrpo_loss,
)

# the hand-written formulas read python floats out of tensors that require grad
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _wmean(losses: list[float], weights: list[float] | None) -> float:
    """The contract: (1/B) sum_p w_p l_p (not sum w l / sum w)."""
    if weights is None:
        weights = [1.0] * len(losses)
    return sum(w * v for w, v in zip(weights, losses, strict=True)) / len(losses)


def _vec(n, lo=-30.0, hi=-1.0):
    return (torch.rand(n, dtype=torch.float64) * (hi - lo) + lo).requires_grad_()


def _weights(n):
    return torch.rand(n, dtype=torch.float64) + 0.05


@pytest.mark.parametrize("reduction", ["token_mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_sft_loss_formula(reduction, weighted):
    n, length = 5, 7
    logps = -torch.rand(n, length, dtype=torch.float64) * 5
    mask = torch.rand(n, length) > 0.3
    mask[:, 0] = True
    w = _weights(n) if weighted else None
    got = weighted_sft_loss(logps, mask, w, reduction=reduction)
    per = []
    for j in range(n):
        toks = [float(logps[j, t]) for t in range(length) if mask[j, t]]
        s = sum(toks)
        per.append(-(s / len(toks) if reduction == "token_mean" else s))
    want = _wmean(per, None if w is None else w.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_weighted_sft_loss_weights_scale_and_select():
    logps = -torch.rand(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    w = _weights(3)
    a = weighted_sft_loss(logps, mask, w)
    b = weighted_sft_loss(logps, mask, w * 7.5)
    torch.testing.assert_close(b, 7.5 * a)  # a weight is a scale, not a share of the batch
    only_first = weighted_sft_loss(logps, mask, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(only_first, -logps[0].mean() / 3)
    # a batch of one keeps its weight (a per-batch sum w l / sum w would cancel it)
    one = weighted_sft_loss(logps[:1], mask[:1], torch.tensor([0.25], dtype=torch.float64))
    torch.testing.assert_close(one, -0.25 * logps[0].mean())


def test_zero_weights_give_zero_loss_not_an_error():
    logps = (-torch.rand(2, 3, dtype=torch.float64)).requires_grad_()
    loss = weighted_sft_loss(logps, torch.ones(2, 3), torch.zeros(2, dtype=torch.float64))
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, logps)
    assert bool((g == 0).all())
    pc, pr = _vec(2), _vec(2)
    out = simpo_loss(pc, pr, torch.ones(2), torch.ones(2), beta=1.0, gamma=0.0, weights=torch.zeros(2))
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_weighted_dpo_unit_weights_equal_standard_dpo():
    p = 9
    pc, pr, rc, rr = _vec(p), _vec(p), _vec(p), _vec(p)
    beta = 0.1 + torch.rand(()).item()
    out = weighted_dpo_loss(pc, pr, rc, rr, beta=beta, weights=torch.ones(p, dtype=torch.float64))
    ours = out.loss
    standard = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(ours, standard, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(weighted_dpo_loss(pc, pr, rc, rr, beta=beta).loss, standard, rtol=1e-14, atol=1e-14)
    # the rewards next to the loss are TRL's: beta * (policy - reference), detached
    torch.testing.assert_close(out.chosen_rewards, (beta * (pc - rc)).detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.rejected_rewards, (beta * (pr - rr)).detach(), rtol=1e-14, atol=1e-14)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    g_ours = torch.autograd.grad(ours, (pc, pr))
    g_std = torch.autograd.grad(standard, (pc, pr))
    for a, b in zip(g_ours, g_std, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("normalised", [False, True])
def test_weighted_dpo_formula(normalised):
    p = 6
    pc, pr, rc, rr = _vec(p), _vec(p), _vec(p), _vec(p)
    w = _weights(p)
    lc = torch.randint(1, 20, (p,))
    lr = torch.randint(1, 20, (p,))
    beta = 0.3
    kw = {"chosen_lengths": lc, "rejected_lengths": lr} if normalised else {}
    out = weighted_dpo_loss(pc, pr, rc, rr, beta=beta, weights=w, **kw)
    got = out.loss
    per = []
    for i in range(p):
        nc = float(lc[i]) if normalised else 1.0
        nr = float(lr[i]) if normalised else 1.0
        z = beta * ((float(pc[i]) - float(rc[i])) / nc - (float(pr[i]) - float(rr[i])) / nr)
        per.append(-_logsig(z))
        nc_reward = beta * (float(pc[i]) - float(rc[i])) / nc
        assert out.chosen_rewards[i].item() == pytest.approx(nc_reward, rel=1e-12)
    assert got.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)


def test_simpo_formula_and_gradient():
    p = 7
    pc, pr = _vec(p), _vec(p)
    lc, lr = torch.randint(1, 30, (p,)), torch.randint(1, 30, (p,))
    w = _weights(p)
    beta, gamma = 2.0, 0.7
    out = simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma, weights=w)
    per = [-_logsig(beta / float(lc[i]) * float(pc[i]) - beta / float(lr[i]) * float(pr[i]) - gamma) for i in range(p)]
    assert out.loss.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)
    torch.testing.assert_close(out.chosen_rewards, (beta * pc / lc).detach())
    torch.testing.assert_close(out.rejected_rewards, (beta * pr / lr).detach())
    assert torch.autograd.gradcheck(
        lambda a, b: simpo_loss(a, b, lc, lr, beta=beta, gamma=gamma, weights=w).loss,
        (pc.detach().requires_grad_(), pr),
    )
    # raising the chosen log-prob lowers the loss
    g = torch.autograd.grad(simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma).loss, pc)[0]
    assert bool((g < 0).all())


def test_wrpo_formula_and_alpha_zero_is_dpo_on_target():
    p = 5
    ws, wt, yl, rws, rwt, rl = (_vec(p) for _ in range(6))
    beta, alpha = 0.5, 0.3
    out = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=alpha)
    per = []
    for i in range(p):
        r = [beta * (float(a[i]) - float(b[i])) for a, b in ((ws, rws), (wt, rwt), (yl, rl))]
        per.append(-_logsig(alpha * r[0] + (1 - alpha) * r[1] - r[2]))
        assert out.source_chosen_rewards[i].item() == pytest.approx(r[0], rel=1e-12)
        assert out.target_chosen_rewards[i].item() == pytest.approx(r[1], rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(alpha * r[0] + (1 - alpha) * r[1], rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(r[2], rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(per) / p, rel=1e-12)
    at0 = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=0.0).loss
    dpo = weighted_dpo_loss(wt, yl, rwt, rl, beta=beta).loss
    torch.testing.assert_close(at0, dpo, rtol=1e-14, atol=1e-14)
    # alpha = 0: no gradient reaches the source-chosen response
    g = torch.autograd.grad(at0, ws, allow_unused=True)[0]
    assert g is None or bool((g == 0).all())
    w = _weights(p)
    got_w = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=alpha, weights=w).loss
    assert got_w.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)


def test_wrpo_alpha_schedule():
    assert wrpo_alpha(0, 100, 0.8) == 0.0
    assert wrpo_alpha(50, 100, 0.8) == pytest.approx(0.4)
    assert wrpo_alpha(100, 100, 0.8) == pytest.approx(0.8)
    assert wrpo_alpha(250, 100, 0.8) == pytest.approx(0.8)
    assert wrpo_alpha(3, 0, 0.5) == 0.5
    with pytest.raises(ValueError, match="alpha_max"):
        wrpo_alpha(1, 10, 1.5)


def _loo_advantage(rewards: list[float], groups: list[int], j: int) -> float:
    """r_j minus the mean reward of the other responses to the same prompt, by enumeration (0 when alone)."""
    others = [rewards[i] for i in range(len(rewards)) if i != j and groups[i] == groups[j]]
    return rewards[j] - sum(others) / len(others) if others else 0.0


def test_rloo_advantages_leave_one_out():
    groups = torch.tensor([7, 3, 7, 7, 3, 9])
    rewards = torch.randn(6, dtype=torch.float64)
    adv = rloo_advantages(rewards, groups)
    for j in range(6):
        others = [float(rewards[i]) for i in range(6) if i != j and groups[i] == groups[j]]
        want = float(rewards[j]) - sum(others) / len(others) if others else 0.0
        assert adv[j].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_rloo_loss_formula(with_kl, with_lengths):
    n = 8
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    lp = _vec(n)
    rewards = torch.randn(n, dtype=torch.float64)
    w = _weights(n)
    lengths = torch.randint(1, 12, (n,))
    kl = torch.rand(n, dtype=torch.float64) if with_kl else None
    kl_coef = 0.2
    out = rloo_loss(lp, rewards, groups, w, lengths=lengths if with_lengths else None, kl=kl, kl_coef=kl_coef)
    got = out.loss
    # expected advantages by enumeration of each response's group-mates, independent of the code's expression
    adv = [_loo_advantage(rewards.tolist(), groups.tolist(), j) for j in range(n)]
    torch.testing.assert_close(out.advantages, torch.tensor(adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    per = []
    for j in range(n):
        s = float(lp[j]) / (float(lengths[j]) if with_lengths else 1.0)
        v = -adv[j] * s
        if with_kl:
            v += kl_coef * float(kl[j])
        per.append(v)
    assert got.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)
    # the best response of each group is pushed up
    g = torch.autograd.grad(got, lp)[0]
    best = torch.stack([rewards[groups == k].argmax() + (groups == k).nonzero()[0, 0] for k in range(3)])
    assert bool((g[best] < 0).all())


def test_bad_inputs_name_the_argument():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        weighted_dpo_loss(a, torch.zeros(4), a, a, beta=0.1)
    with pytest.raises(ValueError, match="chosen_lengths"):
        weighted_dpo_loss(a, a, a, a, beta=0.1, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="rejected_lengths"):
        simpo_loss(a, a, torch.ones(3), torch.tensor([1, 0, 2]), beta=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="weights"):
        weighted_sft_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        weighted_sft_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="mask"):
        weighted_sft_loss(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="alpha"):
        wrpo_loss(a, a, a, a, a, a, beta=0.1, alpha=2.0)
    with pytest.raises(ValueError, match="group_ids"):
        rloo_loss(a, a, torch.zeros(3))


def test_rloo_advantages_closed_form():
    """A second, independent form: A_j = K / (K - 1) * (r_j - mean of the whole group)."""
    k, groups_n = 4, 5
    rewards = torch.randn(k * groups_n, dtype=torch.float64)
    groups = torch.arange(groups_n).repeat_interleave(k)[torch.randperm(k * groups_n)]
    want = torch.empty_like(rewards)
    for g in range(groups_n):
        m = groups == g
        want[m] = k / (k - 1) * (rewards[m] - rewards[m].mean())
    torch.testing.assert_close(rloo_advantages(rewards, groups), want, rtol=1e-12, atol=1e-12)


# ---- the weighted-loss contract: minibatch gradients average to the full-batch gradient -----------------------

_N = 6  # divisible by every batch size below


def _loss_cases():
    """name -> (params, loss(params, index) -> scalar over the rows `index`); weights are dataset-normalised."""
    w = torch.rand(_N, dtype=torch.float64) * 3
    w = w * _N / w.sum()  # mean 1 over the dataset
    lc, lr = torch.randint(1, 9, (_N,)), torch.randint(1, 9, (_N,))
    ref = [torch.randn(_N, dtype=torch.float64) for _ in range(3)]
    sft_mask = torch.rand(_N, 5) > 0.3
    sft_mask[:, 0] = True

    def sft(p, i):
        return weighted_sft_loss(p[0].reshape(_N, 5)[i], sft_mask[i], w[i])

    def dpo(p, i):
        return weighted_dpo_loss(p[0][i], p[1][i], ref[0][i], ref[1][i], beta=0.7, weights=w[i]).loss

    def dpo_norm(p, i):
        kw = {"chosen_lengths": lc[i], "rejected_lengths": lr[i]}
        return weighted_dpo_loss(p[0][i], p[1][i], ref[0][i], ref[1][i], beta=0.7, weights=w[i], **kw).loss

    def simpo(p, i):
        return simpo_loss(p[0][i], p[1][i], lc[i], lr[i], beta=2.0, gamma=0.4, weights=w[i]).loss

    def wrpo(p, i):
        policy, refs = (p[0][i], p[2][i], p[1][i]), (ref[0][i], ref[2][i], ref[1][i])
        return wrpo_loss(*policy, *refs, beta=0.5, alpha=0.3, weights=w[i]).loss

    # RLOO: batches hold whole groups; 6 groups of 3 responses, rows grouped by prompt
    k = 3
    rewards = torch.randn(_N * k, dtype=torch.float64)
    gw = torch.rand(_N * k, dtype=torch.float64)
    gw = gw * gw.numel() / gw.sum()
    kl = torch.rand(_N * k, dtype=torch.float64)

    def rloo(p, i):
        rows = (i[:, None] * k + torch.arange(k)).reshape(-1)
        lp = p[0][rows]
        return rloo_loss(lp, rewards[rows], rows // k, gw[rows], kl=kl[rows] * lp.abs(), kl_coef=0.1).loss

    n_params = {"sft": 1, "dpo": 2, "dpo_norm": 2, "simpo": 2, "wrpo": 3, "rloo": 1}
    params = {"sft": [_vec(_N * 5, -4.0, -0.1)], "rloo": [_vec(_N * k)]}
    fns = {"sft": sft, "dpo": dpo, "dpo_norm": dpo_norm, "simpo": simpo, "wrpo": wrpo, "rloo": rloo}
    return {name: (params.get(name) or [_vec(_N) for _ in range(n_params[name])], fn) for name, fn in fns.items()}


@pytest.mark.parametrize("name", ["sft", "dpo", "dpo_norm", "simpo", "wrpo", "rloo"])
def test_minibatch_gradients_average_to_the_full_batch_gradient(name):
    params, fn = _loss_cases()[name]
    order = torch.randperm(_N)  # shuffled, as a sampler would
    full = torch.autograd.grad(fn(params, order), params)
    for bs in (1, 3, _N):
        batches = order.split(bs)
        grads = [torch.autograd.grad(fn(params, b), params) for b in batches]
        mean = [sum(g[j] for g in grads) / len(batches) for j in range(len(params))]
        for a, b in zip(mean, full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name}, batch size {bs}")
        # and the mean of the minibatch losses is the full loss
        losses = [fn(params, b).item() for b in batches]
        assert sum(losses) / len(losses) == pytest.approx(fn(params, order).item(), rel=1e-12)
