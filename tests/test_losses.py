"""Flow-matching pieces (Eq. 1, Algorithm 1) and the weighted-margin DPO loss (Eq. 6-7), against hand numbers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from idglow_core.errors import ConfigError, InputError
from idglow_core.losses import (add_noise, flow_loss, one_step_estimate, per_sample_mse, sample_timesteps,
                                sft_objective, shift_timesteps, velocity_target, weighted_margin_dpo_loss)


def test_noise_target_and_one_step_estimate_by_hand():
    z0 = torch.tensor([[1.0, 2.0]])
    eps = torch.tensor([[3.0, -1.0]])
    t = torch.tensor([0.25])
    zt = add_noise(z0, eps, t)
    assert torch.allclose(zt, torch.tensor([[1.5, 1.25]]))  # 0.75*z0 + 0.25*eps
    v = velocity_target(z0, eps)
    assert torch.allclose(v, torch.tensor([[2.0, -3.0]]))
    assert torch.allclose(one_step_estimate(zt, v, t), z0)  # exact with the true velocity
    # flow term: v off by (1, -1) -> mean of squares = 1; off by (2, 0) -> 2
    pred = torch.tensor([[3.0, -4.0], [4.0, -3.0]])
    assert torch.allclose(flow_loss(pred, v.expand(2, 2)), torch.tensor([1.0, 2.0]))


def test_shapes_are_checked():
    with pytest.raises(InputError, match="one flow time per sample"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(InputError, match="differs from target"):
        per_sample_mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_timestep_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(4000, scheme="uniform", generator=g)
    assert u.shape == (4000,) and 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    ln = sample_timesteps(4000, scheme="logit_normal", logit_mean=1.0, generator=g)
    assert abs(torch.logit(ln).mean().item() - 1.0) < 0.06  # logit of the samples ~ N(1, 1)
    assert torch.allclose(shift_timesteps(torch.tensor([0.5, 0.0, 1.0]), 3.0), torch.tensor([0.75, 0.0, 1.0]))
    mu = 0.694  # Qwen-Image's exponential shift e^mu / (e^mu + 1/t - 1) is the same map with s = e^mu
    t = torch.tensor([0.3])
    assert torch.allclose(shift_timesteps(t, math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / t - 1))
    with pytest.raises(ConfigError, match="Unknown timestep scheme"):
        sample_timesteps(2, scheme="cosine")


def test_sft_objective_by_hand_ignores_id_where_omega_is_zero():
    flow = torch.tensor([0.5, 1.0])
    omega = torch.tensor([0.0, 0.5])
    id_loss = torch.tensor([float("nan"), 0.4], requires_grad=True)  # skipped sample may hold anything
    loss = sft_objective(flow, omega, id_loss, lambda_base=0.2)
    assert loss.item() == pytest.approx((0.5 + 1.0 + 0.5 * 0.2 * 0.4) / 2)  # Eq. 1 = 0.77
    loss.backward()
    assert id_loss.grad.tolist() == pytest.approx([0.0, 0.5 * 0.2 / 2])


ERRS = dict(model_err_w=torch.tensor([0.5, 0.2], dtype=torch.float64),
            model_err_l=torch.tensor([0.3, 0.6], dtype=torch.float64),
            ref_err_w=torch.tensor([0.4, 0.4], dtype=torch.float64),
            ref_err_l=torch.tensor([0.4, 0.4], dtype=torch.float64))
# Delta_w = [0.1, -0.2], Delta_l = [-0.1, 0.2]


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -logsigmoid(z) = log(1 + e^-z) = softplus(-z)


@pytest.mark.parametrize("beta,alpha,margin,sft,form,expected", [
    # x_i = -beta/2 (alpha dw_i - dl_i); z_i = x_i - m ("intent", default) or x_i + m ("printed", Eq. 7 as typeset)
    # loss = mean softplus(-z_i) + sft * mean(model_err_w)
    (2.0, 1.0, 0.0, 0.0, "intent", (_softplus(0.2) + _softplus(-0.4)) / 2),                # z = [-0.2, 0.4]
    (2.0, 2.0, 0.0, 0.0, "intent", (_softplus(0.3) + _softplus(-0.6)) / 2),                # z = [-0.3, 0.6]
    (2.0, 1.0, 0.5, 0.0, "intent", (_softplus(0.7) + _softplus(0.1)) / 2),                 # z = [-0.7, -0.1]
    (2.0, 1.0, 0.5, 0.0, "printed", (_softplus(-0.3) + _softplus(-0.9)) / 2),              # z = [0.3, 0.9]
    (10.0, 0.5, 0.1, 0.3, "intent", (_softplus(0.85) + _softplus(-1.4)) / 2 + 0.3 * 0.35),  # z = [-0.75-0.1, 1.5-0.1]
    (10.0, 0.5, 0.1, 0.3, "printed", (_softplus(0.65) + _softplus(-1.6)) / 2 + 0.3 * 0.35),  # z = [-0.75+0.1, 1.5+0.1]
])
def test_weighted_margin_dpo_by_hand(beta, alpha, margin, sft, form, expected):
    loss, metrics = weighted_margin_dpo_loss(**ERRS, beta=beta, alpha=alpha, margin=margin, sft_weight=sft,
                                             margin_form=form)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rewards/chosen"] == pytest.approx(-beta / 2 * (0.1 - 0.2) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(-beta / 2 * (-0.1 + 0.2) / 2)
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    assert metrics["implicit_acc"] == 0.5  # pair 2 preferred, pair 1 not, for every alpha here


def test_margin_enforces_a_gap_only_in_the_intent_form():
    """Policy == reference (x = 0), m = 1: the intent form keeps a loss of log(1 + e) = 1.3133 with slope
    -sigmoid(1) = -0.7311 on x; the printed form already gives log(1 + 1/e) = 0.3133 with slope -0.2689."""
    zero = torch.zeros(1, dtype=torch.float64)
    for form, loss_hand, slope_hand in (("intent", 1.313262, -0.731059), ("printed", 0.313262, -0.268941)):
        mw = zero.clone().requires_grad_(True)
        loss, _ = weighted_margin_dpo_loss(mw, zero, zero, zero, beta=2.0, margin=1.0, margin_form=form)
        loss.backward()  # dL/d(err_w) = dL/dx * dx/d(err_w) = slope * (-beta/2) = -slope at beta 2
        assert loss.item() == pytest.approx(loss_hand, abs=1e-6)
        assert mw.grad.item() == pytest.approx(-slope_hand, abs=1e-6)
    grows = [weighted_margin_dpo_loss(zero, zero, zero, zero, beta=2.0, margin=m)[0].item() for m in (0, 0.5, 1)]
    assert grows == sorted(grows) and grows[0] == pytest.approx(math.log(2))
    with pytest.raises(ConfigError, match="margin_form"):
        weighted_margin_dpo_loss(zero, zero, zero, zero, beta=2.0, margin_form="plus")


def test_defaults_equal_literal_diffusion_dpo():
    """Diffusion-DPO (Wallace et al. train.py): inside = -beta/2 * ((mw - ml) - (rw - rl))."""
    beta = 5000.0
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(6, generator=g, dtype=torch.float64) * 1e-3 for _ in range(4))
    inside = -0.5 * beta * ((mw - ml) - (rw - rl))
    literal = -F.logsigmoid(inside).mean()
    loss, metrics = weighted_margin_dpo_loss(mw, ml, rw, rl, beta=beta)
    assert torch.allclose(loss, literal, rtol=0, atol=1e-14)
    assert metrics["implicit_acc"] == pytest.approx((inside > 0).double().mean().item())
    same, _ = weighted_margin_dpo_loss(mw, ml, mw, ml, beta=beta)  # policy == reference -> log 2
    assert same.item() == pytest.approx(math.log(2.0))


def test_dpo_gradients_analytic_and_gradcheck():
    beta, alpha, margin, lam = 4.0, 1.5, 0.2, 0.1
    mw = ERRS["model_err_w"].clone().requires_grad_(True)
    ml = ERRS["model_err_l"].clone().requires_grad_(True)
    loss, _ = weighted_margin_dpo_loss(mw, ml, ERRS["ref_err_w"], ERRS["ref_err_l"], beta=beta, alpha=alpha,
                                       margin=margin, sft_weight=lam)
    loss.backward()
    dw, dl = mw.detach() - 0.4, ml.detach() - 0.4
    z = -beta / 2 * (alpha * dw - dl) - margin  # the intent form (default)
    s = torch.sigmoid(-z)  # d/dz softplus(-z) = -sigmoid(-z)
    assert torch.allclose(mw.grad, (s * beta / 2 * alpha + lam) / 2)
    assert torch.allclose(ml.grad, -(s * beta / 2) / 2)
    f = lambda a, b: weighted_margin_dpo_loss(a, b, ERRS["ref_err_w"], ERRS["ref_err_l"], beta=beta, alpha=alpha,
                                              margin=margin, sft_weight=lam)[0]
    assert torch.autograd.gradcheck(f, (ERRS["model_err_w"].clone().requires_grad_(True),
                                        ERRS["model_err_l"].clone().requires_grad_(True)))


def test_dpo_rejects_bad_arguments_and_widens_bf16():
    with pytest.raises(ConfigError, match="beta > 0"):
        weighted_margin_dpo_loss(*ERRS.values(), beta=0.0)
    with pytest.raises(ConfigError, match="alpha > 0"):
        weighted_margin_dpo_loss(*ERRS.values(), beta=1.0, alpha=-1.0)
    with pytest.raises(InputError, match="same shape"):
        weighted_margin_dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)
    bf = [v.to(torch.bfloat16) for v in ERRS.values()]
    loss, _ = weighted_margin_dpo_loss(*bf, beta=2.0)
    assert loss.dtype == torch.float32
