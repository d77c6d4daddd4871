"""DPO's reference is the policy it starts from (issue 12, point 2) and ``dpo.sequential`` (point 4).

- ``dpo.reference=start``: from SFT-like weights, step 1 gives loss ln 2 and rewards 0 for alpha 2 (and other
  alpha, beta), also with chosen == rejected; the base reference is far from that (the old behaviour);
- the start copy stays frozen while the policy trains, and the live weights come back after the pass, also
  when the forward raises;
- sequential mode gives the joint mode's loss and gradients (with margin, alpha, lambda_SFT, checkpointing)
  and back-propagates in two parts through the loop's ``backward``.
"""
from __future__ import annotations

import math

import pytest
import torch

from idglow_core.errors import ConfigError, InputError
from idglow_core.training.config import LossConfig
from idglow_core.training.dpo import DPOConfig, DPOStep, StartReference, load_dpo_config, reference_policy
from test_dpo_step import TINY, _args, _batch, _tiny_module


@pytest.mark.parametrize("alpha,beta", [(2.0, 2500.0), (2.0, 50.0), (0.5, 5000.0)])
def test_start_reference_gives_log2_and_zero_rewards_at_step_one(alpha, beta):
    module, batch = _tiny_module(perturb=True), _batch()  # trained-looking adapter + LoRA = the SFT start
    step = DPOStep(LossConfig(), DPOConfig(alpha=alpha, beta=beta), StartReference(module))
    out = step(module, batch, torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.logs["rewards/chosen"] == 0.0 and out.logs["rewards/rejected"] == 0.0
    same = dict(batch, latents_rejected=batch["latents"].clone())  # identical chosen and rejected
    assert step(module, same, torch.Generator().manual_seed(0)).loss.item() == pytest.approx(math.log(2), abs=1e-6)
    base = DPOStep(LossConfig(), DPOConfig(alpha=alpha, beta=beta), reference_policy)
    assert abs(base(module, same, torch.Generator().manual_seed(0)).loss.item() - math.log(2)) > 0.05


def test_default_reference_is_the_start_and_base_is_kept_as_an_option():
    assert DPOConfig().reference == "start" and DPOConfig().sequential is False
    assert load_dpo_config(TINY, ["dpo.reference=base"]).dpo.reference == "base"
    with pytest.raises(ConfigError, match="dpo.reference"):
        DPOConfig(reference="sft")


def test_start_copy_stays_frozen_while_the_policy_trains():
    module, batch = _tiny_module(perturb=True), _batch()
    args = _args(batch, torch.tensor([0.3, 0.8, 0.3, 0.8]))
    ref = StartReference(module)
    with torch.no_grad():
        start_out = module(*args)
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05)  # an optimizer step
        moved = module(*args)
        with ref(module):
            as_reference = module(*args)
        after = module(*args)
        with pytest.raises(InputError):
            with ref(module):
                module(args[0][..., :7], *args[1:])  # odd latent width: the packing raises inside
        again = module(*args)
    assert torch.equal(as_reference, start_out) and (moved - start_out).abs().max() > 1e-3
    assert torch.equal(after, moved) and torch.equal(again, moved)


def _grads(module, dpo: DPOConfig, checkpointing: bool):
    module.double()  # float64: joint (2B rows) and sequential (B rows) then agree to rounding, not to fp32 noise
    if checkpointing:
        module.transformer.enable_gradient_checkpointing()
    parts = []

    def backward(loss, last=True):
        parts.append(last)
        loss.backward()

    ref = StartReference(module)
    with torch.no_grad():  # move the policy away from its start so that Delta != 0 and the sigmoid is not 1/2
        for n, p in module.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(0.02)
    batch = {k: [r.double() for r in v] if k == "ref_latents" else v.double() if v.is_floating_point() else v
             for k, v in _batch().items()}
    out = DPOStep(LossConfig(), dpo, ref)(module, batch, torch.Generator().manual_seed(7))
    if out.run_backward is None:
        backward(out.loss)
    else:
        out.run_backward(backward)
    return out, parts, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sequential_mode_gives_the_joint_gradients(checkpointing):
    kw = dict(beta=300.0, alpha=1.7, margin=0.3, sft_weight=0.2)
    joint, joint_parts, g_joint = _grads(_tiny_module(), DPOConfig(**kw), checkpointing)
    seq, seq_parts, g_seq = _grads(_tiny_module(), DPOConfig(sequential=True, **kw), checkpointing)
    assert joint_parts == [True] and seq_parts == [False, True]  # two backward parts, the last one syncs
    assert seq.loss.item() == pytest.approx(joint.loss.item(), rel=1e-10)
    assert abs(joint.loss.item() - math.log(2)) > 1e-3  # not vacuous: the preference is not neutral
    for key in ("rewards/chosen", "rewards/rejected", "implicit_acc", "mse/chosen", "mse_ref/rejected"):
        assert seq.logs[key] == pytest.approx(joint.logs[key], rel=1e-9, abs=1e-12)
    assert set(g_seq) == set(g_joint) and len(g_joint) > 10
    assert any(g.abs().max() > 0 for g in g_joint.values())
    for n in g_joint:
        assert torch.allclose(g_seq[n], g_joint[n], rtol=1e-8, atol=1e-12), n
