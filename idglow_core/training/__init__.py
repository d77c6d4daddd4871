"""IdGlow trainers: SFT (Algorithm 1) and group-level DPO (Eq. 6-7) on one shared loop.

    from idglow_core.training import load_config, run_sft
    cfg = load_config("train/configs/tiny_cpu.yaml", overrides=["optim.max_steps=3"])
    result = run_sft(cfg)            # -> result.final_dir / "idglow_adapter.safetensors"

    from idglow_core.training import load_dpo_config, run_dpo
    result = run_dpo(load_dpo_config("train/configs/dpo_tiny_cpu.yaml"))

Modules: ``config`` (dataclasses + YAML + overrides), ``data`` (manifest validation, synthetic set),
``encode`` (latents / prompt embeddings, cache, collate), ``models`` (train modes, the train module),
``identity`` (Eq. 3 on decoded estimates), ``loop`` (accelerate loop shared by trainers), ``checkpoint``
(atomic checkpoints, resume), ``export`` (adapter / LoRA / full weights), ``comfy_export`` (the DiT as one
ComfyUI file), ``crop_fidelity`` (what ``id_decode=crop`` costs in accuracy), ``sft`` (the SFT step),
``dpo`` / ``dpo_reference`` / ``dpo_data`` (the DPO step, its reference policy and pair data).
"""
from __future__ import annotations

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "run_sft", "run_dpo", "load_dpo_config"]


def __getattr__(name: str):
    if name == "run_sft":
        from .sft import run_sft
        return run_sft
    if name in ("run_dpo", "load_dpo_config"):
        from . import dpo
        return getattr(dpo, name)
    raise AttributeError(f"module 'idglow_core.training' has no attribute '{name}'")
