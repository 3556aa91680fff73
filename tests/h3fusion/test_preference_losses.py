"""h3fusion.losses preference losses vs hand-written scalar formulas (python floats, one example at a time)."""

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
    if weights is None:
        weights = [1.0] * len(losses)
    return sum(w * v for w, v in zip(weights, losses, strict=True)) / sum(weights)


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


def test_weighted_sft_loss_weights_are_scale_invariant_and_select():
    logps = -torch.rand(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    w = _weights(3)
    a = weighted_sft_loss(logps, mask, w)
    b = weighted_sft_loss(logps, mask, w * 7.5)
    torch.testing.assert_close(a, b)
    only_first = weighted_sft_loss(logps, mask, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(only_first, -logps[0].mean())


def test_weighted_dpo_unit_weights_equal_standard_dpo():
    p = 9
    pc, pr, rc, rr = _vec(p), _vec(p), _vec(p), _vec(p)
    beta = 0.1 + torch.rand(()).item()
    ours = weighted_dpo_loss(pc, pr, rc, rr, beta=beta, weights=torch.ones(p, dtype=torch.float64))
    standard = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(ours, standard, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(weighted_dpo_loss(pc, pr, rc, rr, beta=beta), standard, rtol=1e-14, atol=1e-14)
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
    got = weighted_dpo_loss(pc, pr, rc, rr, beta=beta, weights=w, **kw)
    per = []
    for i in range(p):
        nc = float(lc[i]) if normalised else 1.0
        nr = float(lr[i]) if normalised else 1.0
        z = beta * ((float(pc[i]) - float(rc[i])) / nc - (float(pr[i]) - float(rr[i])) / nr)
        per.append(-_logsig(z))
    assert got.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)


def test_simpo_formula_and_gradient():
    p = 7
    pc, pr = _vec(p), _vec(p)
    lc, lr = torch.randint(1, 30, (p,)), torch.randint(1, 30, (p,))
    w = _weights(p)
    beta, gamma = 2.0, 0.7
    got = simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma, weights=w)
    per = [-_logsig(beta / float(lc[i]) * float(pc[i]) - beta / float(lr[i]) * float(pr[i]) - gamma) for i in range(p)]
    assert got.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: simpo_loss(a, b, lc, lr, beta=beta, gamma=gamma, weights=w), (pc.detach().requires_grad_(), pr)
    )
    # raising the chosen log-prob lowers the loss
    g = torch.autograd.grad(simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma), pc)[0]
    assert bool((g < 0).all())


def test_wrpo_formula_and_alpha_zero_is_dpo_on_target():
    p = 5
    ws, wt, yl, rws, rwt, rl = (_vec(p) for _ in range(6))
    beta, alpha = 0.5, 0.3
    got = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=alpha)
    per = []
    for i in range(p):
        r = [beta * (float(a[i]) - float(b[i])) for a, b in ((ws, rws), (wt, rwt), (yl, rl))]
        per.append(-_logsig(alpha * r[0] + (1 - alpha) * r[1] - r[2]))
    assert got.item() == pytest.approx(sum(per) / p, rel=1e-12)
    at0 = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=0.0)
    torch.testing.assert_close(at0, weighted_dpo_loss(wt, yl, rwt, rl, beta=beta), rtol=1e-14, atol=1e-14)
    # alpha = 0: no gradient reaches the source-chosen response
    g = torch.autograd.grad(at0, ws, allow_unused=True)[0]
    assert g is None or bool((g == 0).all())
    w = _weights(p)
    got_w = wrpo_loss(ws, wt, yl, rws, rwt, rl, beta=beta, alpha=alpha, weights=w)
    assert got_w.item() == pytest.approx(_wmean(per, w.tolist()), rel=1e-12)


def test_wrpo_alpha_schedule():
    assert wrpo_alpha(0, 100, 0.8) == 0.0
    assert wrpo_alpha(50, 100, 0.8) == pytest.approx(0.4)
    assert wrpo_alpha(100, 100, 0.8) == pytest.approx(0.8)
    assert wrpo_alpha(250, 100, 0.8) == pytest.approx(0.8)
    assert wrpo_alpha(3, 0, 0.5) == 0.5
    with pytest.raises(ValueError, match="alpha_max"):
        wrpo_alpha(1, 10, 1.5)


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
    got = rloo_loss(lp, rewards, groups, w, lengths=lengths if with_lengths else None, kl=kl, kl_coef=kl_coef)
    adv = rloo_advantages(rewards, groups)
    per = []
    for j in range(n):
        s = float(lp[j]) / (float(lengths[j]) if with_lengths else 1.0)
        v = -float(adv[j]) * s
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
    with pytest.raises(ValueError, match="mask"):
        weighted_sft_loss(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="alpha"):
        wrpo_loss(a, a, a, a, a, a, beta=0.1, alpha=2.0)
    with pytest.raises(ValueError, match="group_ids"):
        rloo_loss(a, a, torch.zeros(3))
