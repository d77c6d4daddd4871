"""One DPO step (Eq. 6-7) and the reference policy.

- the step against a hand computation (one-parameter stand-in network, injected reference switch);
- chosen and rejected see the same t and noise (recorded at the network's input);
- the reference pass of the real tiny module equals the base DiT bit for bit (adapter and LoRA truly off),
  and leaves the adapter/LoRA trainable and active afterwards, also when the forward raises.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from idglow_core.errors import InputError
from idglow_core.training.config import LossConfig
from idglow_core.training.dpo import DPOConfig, DPOStep, load_dpo_config, reference_policy
from idglow_core.training.packing import edit_inputs, unpack_latents

TINY = Path(__file__).resolve().parents[1] / "train" / "configs" / "dpo_tiny_cpu.yaml"


class Velocity(nn.Module):
    """v = w * z_t for the policy, v = 0.5 * z_t for the reference."""

    def __init__(self):
        super().__init__()
        self.w, self.is_reference = nn.Parameter(torch.tensor(0.7)), False

    def forward(self, z_t, t, refs, pe, pm, ids, id_mask, inject=None):
        return (0.5 if self.is_reference else self.w) * z_t


@contextlib.contextmanager
def as_reference(module):
    module.is_reference = True
    try:
        yield module
    finally:
        module.is_reference = False


def _batch(b: int = 2, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 4, 1, 8, 8, generator=g),
            "latents_rejected": torch.randn(b, 4, 1, 8, 8, generator=g),
            "ref_latents": [torch.randn(b, 4, 1, 8, 8, generator=g) for _ in range(2)],
            "prompt_embeds": torch.randn(b, 5, 16, generator=g), "prompt_mask": torch.ones(b, 5, dtype=torch.long),
            "id_embeds": torch.nn.functional.normalize(torch.randn(b, 2, 8, generator=g), dim=-1),
            "id_mask": torch.ones(b, 2, dtype=torch.bool)}


def test_weighted_margin_numbers_by_hand():
    from idglow_core.losses import weighted_margin_dpo_loss

    one = lambda x: torch.tensor([x])  # noqa: E731
    # Eq. 6: Delta_w = 1.0 - 1.5 = -0.5, Delta_l = 2.0 - 1.5 = 0.5; beta = 2
    loss, m = weighted_margin_dpo_loss(one(1.0), one(2.0), one(1.5), one(1.5), beta=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # Eq. 7: -log sigmoid(-(-0.5 - 0.5)) = 0.31326
    assert [m[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "implicit_acc")] == [0.5, -0.5, 1, 1]
    # alpha = 2, m = 0.5, lambda = 0.1: -log sigmoid(-(2 * -0.5 - 0.5) - 0.5) + 0.1 * 1.0 = log(1 + e^-1) + 0.1
    loss, _ = weighted_margin_dpo_loss(one(1.0), one(2.0), one(1.5), one(1.5), beta=2.0, alpha=2.0, margin=0.5,
                                       sft_weight=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_step_matches_hand_computation():
    loss_cfg, dpo = LossConfig(), DPOConfig(beta=40.0, alpha=0.7, margin=0.2, sft_weight=0.1)
    module, batch = Velocity(), _batch()
    out = DPOStep(loss_cfg, dpo, reference=as_reference)(module, batch, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)  # the step's draws: t ~ U(0, 1) per pair, then one noise per pair
    t = torch.rand(2, generator=g)
    eps = torch.randn(batch["latents"].shape, generator=g)
    total, acc, chosen_rewards = 0.0, 0, []
    for i in range(2):
        err = {}
        for side, z0 in (("w", batch["latents"][i]), ("l", batch["latents_rejected"][i])):
            z_t = (1 - t[i]) * z0 + t[i] * eps[i]             # same t and eps for both sides
            target = eps[i] - z0                               # v* (Eq. 6)
            err[side] = ((0.7 * z_t - target) ** 2).mean().item()
            err["ref_" + side] = ((0.5 * z_t - target) ** 2).mean().item()
        d_w, d_l = err["w"] - err["ref_w"], err["l"] - err["ref_l"]        # Eq. 6
        pref = -dpo.beta / 2 * (dpo.alpha * d_w - d_l)
        total += -math.log(1 / (1 + math.exp(-(pref - dpo.margin)))) + dpo.sft_weight * err["w"]  # Eq. 7 (x - m)
        acc += pref > 0
        chosen_rewards.append(-dpo.beta / 2 * d_w)
    assert out.loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert out.logs["loss/dpo"] == pytest.approx(total / 2, rel=1e-5)
    assert out.logs["implicit_acc"] == acc / 2
    assert out.logs["rewards/chosen"] == pytest.approx(sum(chosen_rewards) / 2, rel=1e-5)
    out.loss.backward()
    assert module.w.grad is not None and module.w.grad.abs() > 0 and not module.is_reference


def _tiny_module(train: str = "lora", perturb: bool = True):
    from idglow_core.testing import tiny_edit_pipeline
    from idglow_core.training.models import build_train_module

    cfg = load_dpo_config(TINY, [f"run.train={train}"]).train
    torch.manual_seed(0)
    module = build_train_module(cfg, tiny_edit_pipeline(text_encoder=False, seed=0), id_dim=8)
    if perturb:  # a trained-looking adapter and LoRA, so that policy != base
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.requires_grad and ("to_out" in name or "lora_B" in name):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _args(batch: dict, t: torch.Tensor):
    z_t = torch.cat([batch["latents"], batch["latents_rejected"]])
    two = lambda x: torch.cat([x, x])  # noqa: E731
    return (z_t, t, [two(r) for r in batch["ref_latents"]], two(batch["prompt_embeds"]), two(batch["prompt_mask"]),
            two(batch["id_embeds"]), two(batch["id_mask"]))


class Recorder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, []

    def forward(self, *args):
        self.calls.append([a.clone() if torch.is_tensor(a) else [r.clone() for r in a] for a in args])
        return self.module(*args)


def test_chosen_and_rejected_share_t_and_noise():
    rec, batch = Recorder(_tiny_module()), _batch()
    out = DPOStep(LossConfig(), DPOConfig())(rec, batch, torch.Generator().manual_seed(4))
    assert len(rec.calls) == 2  # reference pass, then policy pass, on the same inputs
    for a, b in zip(*rec.calls):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
    z_t, t = rec.calls[1][0], rec.calls[1][1]
    assert t.shape == (4,) and torch.equal(t[:2], t[2:]) and t[0] != t[1]
    z0 = torch.cat([batch["latents"], batch["latents_rejected"]])
    eps = (z_t - (1 - t).view(-1, 1, 1, 1, 1) * z0) / t.view(-1, 1, 1, 1, 1)  # recover the noise
    assert torch.allclose(eps[:2], eps[2:], atol=1e-4) and not torch.allclose(eps[0], eps[1], atol=1e-1)
    assert {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "implicit_acc"} <= set(out.logs)


@pytest.mark.parametrize("train", ["lora", "adapter"])
def test_reference_is_the_base_model_and_restores(train):
    from idglow_core.testing import tiny_edit_pipeline

    module, batch = _tiny_module(train), _batch()
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    args = _args(batch, torch.tensor([0.3, 0.8, 0.3, 0.8]))
    base = tiny_edit_pipeline(text_encoder=False, seed=0).transformer.eval()
    with torch.no_grad():
        policy = module(*args)
        with reference_policy(module):
            reference = module(*args)
            if train == "lora":  # peft switched the LoRA off, and its requires_grad with it
                assert not any(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)
        out = base(**edit_inputs(args[0], args[2], args[1]), encoder_hidden_states=args[3],
                   encoder_hidden_states_mask=args[4], return_dict=False)[0]
        v_base = unpack_latents(out[:, :16], 8, 8)
        after = module(*args)
    assert torch.equal(reference, v_base)  # adapter adds exactly 0 and the LoRA is off
    assert (policy - v_base).abs().max() > 1e-3  # ... which is not vacuous: the policy differs
    assert torch.equal(after, policy)
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags


def test_reference_restores_when_the_forward_raises():
    module, batch = _tiny_module(), _batch()
    frozen = next(p for n, p in module.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)  # peft's enable_adapters() would switch it back on; the snapshot must not
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    args = _args(batch, torch.tensor([0.5, 0.5, 0.5, 0.5]))
    with torch.no_grad():
        policy = module(*args)
        with pytest.raises(InputError):
            with reference_policy(module):
                module(args[0][..., :7], *args[1:])  # odd latent width: the packing raises
        after = module(*args)
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert torch.equal(after, policy) and not module.inject_off


def test_fresh_adapter_starts_at_log2():
    """A fresh adapter (zero output) and fresh LoRA (B = 0) equal the reference: Delta = 0, loss = log 2."""
    out = DPOStep(LossConfig(), DPOConfig())(_tiny_module(perturb=False), _batch(), torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.logs["rewards/margins"] == 0.0 and out.logs["implicit_acc"] == 0.0


def test_gradients_equal_with_gradient_checkpointing():
    """The reference pass must not leak into the recomputation that checkpointing does during backward."""
    grads = []
    for checkpointing in (False, True):
        module = _tiny_module()
        if checkpointing:
            module.transformer.enable_gradient_checkpointing()
        out = DPOStep(LossConfig(), DPOConfig(beta=50.0))(module, _batch(), torch.Generator().manual_seed(2))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    assert any(g.abs().max() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
