"""gating_loss, drift_regularization and load_balancing_loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from h3fusion.losses import (
    drift_regularization,
    expert_drift_norms,
    expert_reference_state,
    gating_loss,
    load_balancing_loss,
    mean_router_probs,
)
from training_tiny import tiny_mixtral_config
from transformers import MixtralForCausalLM


def _tiny_mixtral(num_layers=2, experts=3):
    cfg = tiny_mixtral_config(
        vocab_size=32, hidden=8, intermediate=12, layers=num_layers, experts=experts, max_positions=32
    )
    return MixtralForCausalLM(cfg)


def test_gating_loss_hand_computed():
    # one layer, B=2, S=2, E=3, no padding: p̄_b is the mean of two softmaxes
    z = torch.randn(4, 3)
    mask = torch.ones(2, 2)
    labels = torch.tensor([2, 0])
    p = torch.softmax(z.double(), -1)
    expected = -(math.log(((p[0, 2] + p[1, 2]) / 2).item()) + math.log(((p[2, 0] + p[3, 0]) / 2).item())) / 2
    assert gating_loss([z], mask, labels).item() == pytest.approx(expected, rel=1e-5)


def test_gating_loss_keeps_fp64_logits_in_fp64():
    # fp32 logits compute in fp32 (rel 1e-5 above); fp64 ones (an fp64 model, the tests' exact oracle) stay fp64
    z = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.ones(2, 2)
    labels = torch.tensor([2, 0])
    p = torch.softmax(z, -1)
    expected = -(torch.log((p[0, 2] + p[1, 2]) / 2) + torch.log((p[2, 0] + p[3, 0]) / 2)) / 2
    loss = gating_loss([z], mask, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)


def test_gating_loss_mean_over_layers_then_log():
    z1, z2 = torch.randn(3, 2), torch.randn(3, 2)
    mask = torch.ones(1, 3)
    p = (torch.softmax(z1.double(), -1) + torch.softmax(z2.double(), -1)).sum(0) / 6
    got = gating_loss([z1, z2], mask, torch.tensor([1]))
    assert got.item() == pytest.approx(-math.log(p[1].item()), rel=1e-5)
    # mean of logs would differ (Jensen): the loss is the log of the mean probability
    assert mean_router_probs([z1, z2], mask)[0].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_gating_loss_padding_does_not_change_it():
    b, s, e, layers = 3, 5, 3, 2
    lengths = torch.tensor([5, 2, 3])
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, e, (b,))
    logits = [torch.randn(b * s, e) for _ in range(layers)]
    base = gating_loss(logits, mask, labels)
    # change only the padding positions' logits, drastically: the loss must not move
    pad = (mask == 0).reshape(-1)
    changed = [z.clone() for z in logits]
    for z in changed:
        z[pad] = 50.0 * torch.randn(int(pad.sum()), e)
    assert torch.equal(gating_loss(changed, mask, labels), base)
    # and equals the per-example loss computed without any padding
    per = []
    for i in range(b):
        rows = [z.view(b, s, e)[i, : lengths[i]] for z in logits]
        per.append(gating_loss(rows, torch.ones(1, int(lengths[i])), labels[i : i + 1]))
    assert base.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)


def test_gating_loss_no_double_softmax():
    # Defect (e): CrossEntropy(probabilities) would apply a second softmax. With a confident router on the right
    # expert our loss goes to ~0; the double-softmax version stays near log(E) - something, far from 0.
    z = torch.tensor([[20.0, 0.0, 0.0]])
    ours = gating_loss([z], torch.ones(1, 1), torch.tensor([0]))
    double = torch.nn.functional.cross_entropy(torch.softmax(z, -1), torch.tensor([0]))
    assert ours.item() < 1e-6
    assert double.item() > 0.5


def test_gating_loss_gradient_and_errors():
    z = torch.randn(6, 3, requires_grad=True)
    loss = gating_loss([z], torch.ones(2, 3), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        gating_loss([z], torch.ones(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="router_logits"):
        gating_loss([z], torch.ones(3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="attention_mask"):
        gating_loss([z], torch.tensor([[1, 1, 1], [0, 0, 0]]), torch.tensor([0, 1]))


def test_load_balancing_hand_computed():
    z = torch.randn(4, 3)
    p = torch.softmax(z.double(), -1)
    top = p.topk(2, -1).indices
    f = torch.zeros(3, dtype=torch.double)
    for row in top:
        f[row] += 1
    f /= 8
    expected = 3 * (f * p.mean(0)).sum()
    got = load_balancing_loss([z], torch.ones(1, 4), top_k=2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # padding ignored
    zp = torch.cat([z, 30 * torch.randn(2, 3)])
    got_pad = load_balancing_loss([zp], torch.tensor([[1, 1, 1, 1, 0, 0]]), top_k=2)
    assert got_pad.item() == pytest.approx(expected.item(), rel=1e-5)
    # uniform routing gives exactly 1
    assert load_balancing_loss([torch.zeros(5, 4)], None, top_k=1).item() == pytest.approx(1.0)


def test_drift_regularization_full_weights_hand_computed():
    model = _tiny_mixtral(num_layers=2, experts=3)
    ref = expert_reference_state(model)
    assert set(ref) == {f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in ("gate_up_proj", "down_proj")}
    for p in model.parameters():
        p.requires_grad_(False)
    deltas = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                p.requires_grad_(True)
                d = 0.1 * torch.randn_like(p)
                p.add_(d)
                deltas[name] = d
    # R_i = mean over layers of sqrt(|dGU_i|^2 + |dD_i|^2)
    expected = torch.zeros(3, dtype=torch.double)
    for layer in range(2):
        gu = deltas[f"model.layers.{layer}.mlp.experts.gate_up_proj"].double()
        dn = deltas[f"model.layers.{layer}.mlp.experts.down_proj"].double()
        for i in range(3):
            expected[i] += torch.sqrt(gu[i].pow(2).sum() + dn[i].pow(2).sum()) / 2
    norms = expert_drift_norms(model, ref)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-7)
    gammas = [1e-1, 1e-2, 1e-3]
    got = drift_regularization(model, ref, gammas)
    assert got.item() == pytest.approx(float((torch.tensor(gammas, dtype=torch.double) * expected).sum()), rel=1e-5)
    # squared option
    expected_sq = torch.zeros(3, dtype=torch.double)
    for layer in range(2):
        gu = deltas[f"model.layers.{layer}.mlp.experts.gate_up_proj"].double()
        dn = deltas[f"model.layers.{layer}.mlp.experts.down_proj"].double()
        expected_sq += (gu.pow(2).flatten(1).sum(1) + dn.pow(2).flatten(1).sum(1)) / 2
    torch.testing.assert_close(expert_drift_norms(model, ref, squared=True).double(), expected_sq, rtol=1e-5, atol=0)
    # gradient flows to the expert weights only
    got.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mlp.experts." in n)
    with pytest.raises(ValueError, match="gammas"):
        drift_regularization(model, ref, [1.0, 2.0])


def test_drift_zero_at_fusion_time_has_finite_gradient():
    model = _tiny_mixtral()
    ref = expert_reference_state(model)
    loss = drift_regularization(model, ref, [1.0, 1.0, 1.0])
    assert loss.item() == 0.0
    loss.backward()
    for n, p in model.named_parameters():
        if ".mlp.experts." in n:
            assert torch.isfinite(p.grad).all()


def test_drift_lora_uses_effective_delta_with_scaling():
    peft = pytest.importorskip("peft")
    model = _tiny_mixtral(num_layers=1, experts=3)
    ref = expert_reference_state(model)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    # expected: (alpha/r)·B·A per expert, computed by hand from PEFT's factor layout
    from peft.tuners.lora.layer import ParamWrapper

    sq = torch.zeros(3, dtype=torch.double)
    for _, m in pm.named_modules():
        if isinstance(m, ParamWrapper):
            a = m.lora_A["default"].weight.double()
            b = m.lora_B["default"].weight.double()
            e = 3
            a = a.reshape(e, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
            delta = (8 / 2) * torch.bmm(b, a)  # [E, out, in] or [E, in, out]: same norm either way
            sq += delta.pow(2).flatten(1).sum(1)
    norms = expert_drift_norms(pm, ref)
    torch.testing.assert_close(norms.double(), sq.sqrt(), rtol=1e-5, atol=1e-7)
    assert (norms > 0).all()
