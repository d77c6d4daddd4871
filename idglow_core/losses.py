"""Flow-matching loss pieces (paper Eq. 1, Algorithm 1) and the weighted-margin DPO loss (Eq. 6-7).

Conventions (diffusers FlowMatchEulerDiscreteScheduler / Qwen-Image): flow time ``t`` in [0, 1], 1 = pure
noise; ``z_t = (1 - t) z0 + t eps``; the network predicts the velocity ``v* = eps - z0``; the one-step
estimate of the clean latent is ``z0_hat = z_t - t v``. The transformer is called with ``timestep = t``.

Every reduction runs in at least float32: in bf16 the DPO difference ``Delta_w - Delta_l`` cancels badly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

__all__ = [
    "TIMESTEP_SCHEMES", "sample_timesteps", "shift_timesteps", "add_noise", "velocity_target",
    "one_step_estimate", "per_sample_mse", "flow_loss", "sft_objective", "weighted_margin_dpo_loss",
    "MARGIN_FORMS", "dpo_logit",
]

TIMESTEP_SCHEMES = ("uniform", "logit_normal")
# Eq. 7's margin m. "intent" (default): -log sigmoid(x - m), as SimPO's gamma: the loss only falls once the
# weighted preference x exceeds m, so m enforces a gap. "printed": -log sigmoid(x + m), Eq. 7 as typeset, which
# lowers the loss as m grows and weakens the push (at x = 0, m = 1: loss 0.3133, dL/dx = -0.2689, against
# 1.3133 and -0.7311 for "intent"); kept only to reproduce the printed formula.
MARGIN_FORMS = ("intent", "printed")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Cast to at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t: [B]`` -> ``[B, 1, ..., 1]`` with ``like``'s rank and dtype."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise InputError(f"Expected one flow time per sample, shape [{like.shape[0]}], got {tuple(t.shape)}. "
                         f"Pass t as a 1-D tensor with the batch size of the latents.")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift ``t' = s t / (1 + (s - 1) t)`` (SD3 form; equals Qwen-Image's exponential shift
    ``e^mu / (e^mu + 1/t - 1)`` with ``s = e^mu``). ``shift = 1`` is the identity. ``t: [B]``."""
    if not shift > 0:
        raise ConfigError(f"timestep shift must be > 0, got {shift}. Use 1.0 for no shift, about 2.0 "
                          f"(= e^0.694) to match Qwen-Image at 1024x1024.")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(batch_size: int, *, scheme: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, shift: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw flow times ``t: [B]`` in [0, 1).

    ``uniform`` is Algorithm 1 line 3 (``t ~ U(0, 1)``); ``logit_normal`` is ``sigmoid(N(mean, std))``
    (SD3 / the diffusers Qwen-Image trainer). ``shift`` is then applied by :func:`shift_timesteps`.
    """
    if scheme == "uniform":
        t = torch.rand(batch_size, generator=generator)
    elif scheme == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))
    else:
        raise ConfigError(f"Unknown timestep scheme '{scheme}'. Use one of {', '.join(TIMESTEP_SCHEMES)}.")
    return t if shift == 1.0 else shift_timesteps(t, shift)


def add_noise(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - t) z0 + t eps`` (Algorithm 1 line 4). ``z0, eps: [B, ...]``, ``t: [B]``."""
    s = _bcast(t, z0)
    return (1.0 - s) * z0 + s * eps


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Ground-truth flow ``v* = eps - z0`` (the paper's ``z1 - z0``, Eq. 1 and Eq. 6)."""
    return eps - z0


def one_step_estimate(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z0_hat = z_t - t v`` (Algorithm 1 line 13); exact when ``v = v*``."""
    return z_t - _bcast(t, z_t) * v


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||^2`` averaged over every non-batch dim, in >= float32. Returns ``[B]``."""
    if pred.shape != target.shape:
        raise InputError(f"Prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}. "
                         f"Unpack the transformer output to the latent layout before the loss.")
    return (_wide(pred) - _wide(target)).pow(2).reshape(pred.shape[0], -1).mean(dim=1)


def flow_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample flow term of Eq. 1, ``||v - (eps - z0)||^2``. Returns ``[B]``."""
    return per_sample_mse(v, target)  # Eq. 1 (first term)


def sft_objective(flow: torch.Tensor, omega: torch.Tensor, id_loss: torch.Tensor,
                  lambda_base: float) -> torch.Tensor:
    """Batch mean of ``flow + Omega(t) * lambda_base * L_ID`` (Eq. 1 / Algorithm 1 line 15).

    ``flow, omega, id_loss: [B]``; ``id_loss`` may hold any value where ``omega == 0`` (it is ignored there,
    so callers can skip computing it).
    """
    if not (flow.shape == omega.shape == id_loss.shape and flow.ndim == 1):
        raise InputError(f"flow {tuple(flow.shape)}, omega {tuple(omega.shape)} and id_loss "
                         f"{tuple(id_loss.shape)} must all be [B]. Pass one value per sample.")
    weight = _wide(omega) * float(lambda_base)
    id_term = torch.where(weight != 0, weight * _wide(id_loss), torch.zeros_like(weight))
    return (_wide(flow) + id_term).mean()  # Eq. 1


def _check_dpo_args(errs: tuple[torch.Tensor, ...], beta: float, alpha: float, margin: float,
                    sft_weight: float, margin_form: str = "intent") -> None:
    shapes = {tuple(e.shape) for e in errs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise InputError(f"DPO errors must all have the same shape [B], got {sorted(shapes)}. Reduce each "
                         f"||v - v*||^2 over the non-batch dims first (idglow_core.losses.per_sample_mse).")
    if not (beta > 0 and alpha > 0 and margin >= 0 and sft_weight >= 0 and math.isfinite(beta)):
        raise ConfigError(f"DPO needs beta > 0, alpha > 0, margin >= 0, sft_weight >= 0 (Eq. 7); got beta={beta}, "
                          f"alpha={alpha}, margin={margin}, sft_weight={sft_weight}.")
    if margin_form not in MARGIN_FORMS:
        raise ConfigError(f"DPO margin_form must be one of {MARGIN_FORMS}, got '{margin_form}'. 'intent' is "
                          f"-log sigmoid(x - m) (the margin enforces a gap), 'printed' Eq. 7 as typeset (x + m).")


def dpo_logit(preference: torch.Tensor, margin: float, margin_form: str = "intent") -> torch.Tensor:
    """The argument of Eq. 7's ``-log sigmoid``: ``x - m`` (``intent``, default) or ``x + m`` (``printed``),
    with ``x = -beta/2 (alpha Delta_w - Delta_l)`` ``[B]``. See :data:`MARGIN_FORMS` for why."""
    return preference - margin if margin_form == "intent" else preference + margin


def weighted_margin_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                             ref_err_l: torch.Tensor, *, beta: float, alpha: float = 1.0, margin: float = 0.0,
                             sft_weight: float = 0.0,
                             margin_form: str = "intent") -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted-margin Diffusion-DPO for flow matching (Eq. 6-7).

        L = mean( -log sigmoid(x - m) ) + sft_weight * mean(||v_w - v*_w||^2),  x = -beta/2 (alpha Delta_w - Delta_l)

    Deviation from the printed Eq. 7 (``x + m``): the margin is subtracted, as its stated purpose (a minimum gap
    between chosen and rejected) and SimPO require; ``margin_form="printed"`` gives the typeset sign.

    Each ``*_err`` is the per-sample velocity error ``||v - v*||^2`` averaged over non-batch dims, ``[B]``;
    ``w`` = chosen, ``l`` = rejected, ``model`` = policy (with grad), ``ref`` = reference (no grad).
    Returns the scalar loss and metrics: ``rewards/chosen`` and ``rewards/rejected`` (``-beta/2 * Delta``,
    batch means), ``rewards/margins`` (their difference) and ``implicit_acc`` (fraction of pairs whose
    weighted preference ``-beta/2 (alpha Delta_w - Delta_l)`` is > 0). ``alpha=1, margin=0, sft_weight=0``
    is exactly Diffusion-DPO.
    """
    _check_dpo_args((model_err_w, model_err_l, ref_err_w, ref_err_l), beta, alpha, margin, sft_weight, margin_form)
    m_w, m_l = _wide(model_err_w), _wide(model_err_l)
    r_w, r_l = _wide(ref_err_w).detach(), _wide(ref_err_l).detach()
    delta_w, delta_l = m_w - r_w, m_l - r_l  # Eq. 6
    preference = -0.5 * beta * (alpha * delta_w - delta_l)
    loss = (-F.logsigmoid(dpo_logit(preference, margin, margin_form)) + sft_weight * m_w).mean()  # Eq. 7 (x - m)
    with torch.no_grad():
        chosen, rejected = -0.5 * beta * delta_w, -0.5 * beta * delta_l
        metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                   "rewards/margins": (chosen - rejected).mean().item(),
                   "implicit_acc": (preference > 0).to(m_w.dtype).mean().item()}
    return loss, metrics
