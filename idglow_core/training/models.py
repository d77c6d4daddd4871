"""What a trainer trains: the Qwen-Image-Edit stack, the IdGlow adapter, an optional LoRA, and the one
``nn.Module`` (:class:`IdGlowTrainModule`) that holds every trainable parameter and predicts the velocity.

Train modes (``run.train``): ``adapter`` (adapter only, DiT frozen), ``lora`` (adapter + peft LoRA on the DiT),
``full`` (adapter + the whole DiT). The VAE and the text encoder are always frozen.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..adapter import IdGlowAdapter
from ..errors import ConfigError
from ..schedules import Schedule
from .config import TrainConfig
from .packing import edit_inputs, unpack_latents

__all__ = ["LORA_TARGETS", "build_pipeline", "lora_config", "IdGlowTrainModule", "build_train_module",
           "unused_last_block_modules"]

log = logging.getLogger("idglow")

# Every Linear of a QwenImageTransformerBlock (image stream, text stream, MLPs); adaLN excluded.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def unused_last_block_modules(transformer: nn.Module) -> list[str]:
    """Modules of the last block that only shape its text-stream output, which the transformer discards: the
    output projections and MLP (they get no gradient at all, and DDP with find_unused_parameters=False fails
    on them) and the text queries (their gradient is exactly zero). They are never trained."""
    last = len(transformer.transformer_blocks) - 1
    return [f"transformer_blocks.{last}.{m}" for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2",
                                                       "attn.add_q_proj", "attn.norm_added_q")]


def lora_config(transformer: nn.Module, rank: int, alpha: int):
    """peft ``LoraConfig`` on every block Linear except :func:`unused_last_block_modules`."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS),
                      exclude_modules=unused_last_block_modules(transformer))


def build_pipeline(cfg: TrainConfig, text_encoder: bool = True):
    """``QwenImageEditPlusPipeline`` from ``model.pretrained``, or a tiny random one (``model.tiny``).
    ``text_encoder=False`` leaves the text encoder, tokenizer and processor out (every prompt is cached)."""
    if cfg.model.tiny:
        from ..testing import tiny_edit_pipeline

        return tiny_edit_pipeline(text_encoder=text_encoder, seed=cfg.run.seed)
    from diffusers import QwenImageEditPlusPipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision, torch.float32)
    if cfg.run.train == "full":
        dtype = torch.float32  # trained weights stay fp32 (autocast computes in bf16)
    try:
        skip = {} if text_encoder else {"text_encoder": None, "tokenizer": None, "processor": None}
        pipe = QwenImageEditPlusPipeline.from_pretrained(cfg.model.pretrained, torch_dtype=dtype, **skip)
    except (OSError, ValueError) as exc:
        from ..errors import ModelNotFoundError
        raise ModelNotFoundError(f"Cannot load Qwen-Image-Edit from '{cfg.model.pretrained}' ({exc}). Point "
                                 f"model.pretrained at a local diffusers folder of Qwen-Image-Edit-2511.") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


class IdGlowTrainModule(nn.Module):
    """The DiT with the adapter attached (and a LoRA, when trained). ``forward`` predicts the velocity.

    ``inject`` (``[B]``) is each sample's injection strength, ``Omega_task(t)`` as deployed (the step computes
    it from ``loss.injection``); None = 1. With grad enabled the ID residual is computed at every block and
    then multiplied by it, also where it is 0, so DDP sees every adapter parameter used in every step.
    ``inject_off`` (DPO's base reference) makes the adapter add exactly nothing.
    """

    def __init__(self, transformer: nn.Module, adapter: IdGlowAdapter):
        super().__init__()
        self.transformer, self.adapter = transformer, adapter
        self._hooks = adapter.attach(transformer)
        self.inject_off = False

    def detach_hooks(self) -> None:
        """Remove the adapter's hooks from the transformer (e.g. before handing both to IdGlowPipeline)."""
        self._hooks.detach()

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ref_latents: list[torch.Tensor],
                prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, id_embeds: torch.Tensor,
                id_mask: torch.Tensor, inject: torch.Tensor | None = None) -> torch.Tensor:
        """z_t ``[B, C, 1, h, w]``, t ``[B]``, refs ``[B, C, 1, h_j, w_j]``, prompt ``[B, L, D]`` + ``[B, L]``,
        identities ``[B, K, id_dim]`` + ``[B, K]``, inject ``[B]`` or None -> velocity ``[B, C, 1, h, w]``."""
        weight = 0.0 if self.inject_off else (1.0 if inject is None else inject.to(z_t.device).float())
        cond = self.adapter.condition(id_embeds, id_mask, weight=weight, schedule=Schedule("constant"))
        cond.compute_always = torch.is_grad_enabled() and not self.inject_off
        out = self.transformer(**edit_inputs(z_t, ref_latents, t), encoder_hidden_states=prompt_embeds,
                               encoder_hidden_states_mask=prompt_mask, attention_kwargs={"idglow": cond},
                               return_dict=False)[0]
        h, w = z_t.shape[-2:]
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w)


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def build_train_module(cfg: TrainConfig, pipe, id_dim: int) -> IdGlowTrainModule:
    """Freeze the base, create/load the adapter, add the LoRA or unfreeze the DiT per ``run.train``."""
    transformer = pipe.transformer
    for part in (transformer, pipe.vae, getattr(pipe, "text_encoder", None)):
        if part is not None:
            _freeze(part)
    if cfg.model.init_adapter:
        adapter = IdGlowAdapter.load(cfg.model.init_adapter, transformer)
        if adapter.config.id_dim != id_dim:
            raise ConfigError(f"model.init_adapter expects {adapter.config.id_dim}-d face embeddings but the face "
                              f"backend gives {id_dim}-d. Use the backend the adapter was trained with.")
    else:
        adapter = IdGlowAdapter.init_for(transformer, tokens_per_id=cfg.model.tokens_per_id,
                                         max_ids=cfg.model.max_ids, id_dim=id_dim,
                                         default_schedule=cfg.loss.omega.to_str())
    adapter.float().requires_grad_(True)
    if cfg.run.train == "lora":
        transformer.add_adapter(lora_config(transformer, cfg.model.lora_rank, cfg.model.lora_alpha))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights in fp32 next to a bf16 base
    elif cfg.run.train == "full":
        transformer.requires_grad_(True)
        unused = unused_last_block_modules(transformer)
        for name, p in transformer.named_parameters():
            if any(name.startswith(u + ".") for u in unused):
                p.requires_grad_(False)
    if cfg.run.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train(cfg.run.train != "adapter")
    module = IdGlowTrainModule(transformer, adapter)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("training %s: %.3f M trainable parameters (adapter %.3f M)", cfg.run.train, n_train / 1e6,
             sum(p.numel() for p in adapter.parameters()) / 1e6)
    return module
