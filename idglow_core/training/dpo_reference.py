"""The reference policy of Diffusion-DPO (Eq. 6): what ``Delta = ||v - v*||^2 - ||v_ref - v*||^2`` compares to.

``dpo.reference``:

* ``start`` (default, Diffusion-DPO's definition): the policy DPO starts from, i.e. the SFT adapter + LoRA
  loaded from ``dpo.init_from``. :class:`StartReference` keeps a frozen copy of the trainable tensors (adapter
  + LoRA: ~1.3 % of the DiT for the adapter, plus the LoRA) and swaps it in for the reference pass; the base
  DiT is shared, so there is still no second copy of the 20 B model. At step 1 policy == reference exactly:
  the loss is ln 2 and the rewards are 0 for any alpha and beta.
* ``base``: :func:`reference_policy`, the frozen base DiT (adapter adds exactly nothing, peft LoRA disabled).
  Started from SFT weights, step 1 is then far from ln 2 (saturated for alpha != 1) and the rewards measure
  the policy against the base model.

Both are context managers around a (possibly DDP-wrapped) :class:`IdGlowTrainModule`, used under
``torch.no_grad()`` and exited before any backward (gradient checkpointing recomputes with live weights).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["reference_policy", "StartReference"]


def _train_module(module: nn.Module) -> nn.Module:
    """The IdGlowTrainModule inside DDP / accelerate / test wrappers (each exposes ``.module``)."""
    from .models import IdGlowTrainModule

    inner = module
    while not isinstance(inner, IdGlowTrainModule) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, IdGlowTrainModule):
        raise ConfigError(f"The DPO reference needs an IdGlowTrainModule (possibly wrapped), got "
                          f"{type(module).__name__}. Build it with training.models.build_train_module.")
    return inner


@contextlib.contextmanager
def reference_policy(module: nn.Module) -> Iterator[nn.Module]:
    """``dpo.reference=base``. Inside: ``module`` predicts as the frozen base (adapter adds exactly 0, LoRA
    disabled). On exit, also after an exception: the adapter's injection, the LoRA and every parameter's
    ``requires_grad`` are back.

    Use under ``torch.no_grad()`` and never call ``backward()`` inside (the LoRA is off there)."""
    inner = _train_module(module)
    flags = {name: p.requires_grad for name, p in inner.named_parameters()}
    has_lora = bool(getattr(inner.transformer, "_hf_peft_config_loaded", False))
    inner.inject_off = True  # the block hooks return the block output untouched
    try:
        if has_lora:
            inner.transformer.disable_adapters()  # peft: also sets requires_grad=False on the LoRA
        yield module
    finally:
        inner.inject_off = False
        if has_lora:
            inner.transformer.enable_adapters()
        for name, p in inner.named_parameters():
            p.requires_grad_(flags[name])


class StartReference:
    """``dpo.reference=start``: a frozen copy of ``module``'s trainable tensors taken now (build it after the
    SFT start is loaded and before any optimizer step, e.g. before a resumed run restores its checkpoint).

    ``with ref(module):`` swaps the copy into the parameters (no copy of the values, only ``.data``
    pointers) and swaps the live tensors back on exit, also after an exception. Not for FSDP (its
    parameters are shards); the DPO trainer refuses that combination.
    """

    def __init__(self, module: nn.Module):
        inner = _train_module(module)
        self.start = {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}
        if not self.start:
            raise ConfigError("The DPO start reference found no trainable parameter: build the module with "
                              "run.train=adapter or lora first.")

    @contextlib.contextmanager
    def __call__(self, module: nn.Module) -> Iterator[nn.Module]:
        params = dict(_train_module(module).named_parameters())
        live: dict[str, torch.Tensor] = {}
        try:
            for name, start in self.start.items():
                p = params.get(name)
                if p is None or p.shape != start.shape:
                    raise ConfigError(f"Parameter '{name}' no longer matches the DPO start copy (sharded by FSDP, "
                                      f"or the module changed). Use DDP, or dpo.reference=base.")
                if start.device != p.device or start.dtype != p.dtype:  # accelerate moved the module
                    start = self.start[name] = start.to(device=p.device, dtype=p.dtype)
                live[name] = p.data
                p.data = start
            yield module
        finally:
            for name, data in live.items():
                params[name].data = data
