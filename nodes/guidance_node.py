"""IdGlow Identity Guidance: a MODEL whose sampler moves the x0 estimate toward the reference identities.

Where it hooks in: a sampler **post-CFG function** (``ModelPatcher.set_model_sampler_post_cfg_function``).
ComfyUI calls it with the CFG-combined ``denoised`` (the x0 estimate every sampler steps with) and ``sigma``
(flow time t), for every sampler and guider (KSampler, SamplerCustom, CFGGuider); what it returns is the
estimate the sampler uses. That is exactly the quantity the guidance edits (``idglow_core.guidance``), after
CFG (so the edit is not scaled by cfg) and without touching the DiT: the model's output arrives detached, the
gradient runs through the VAE decoder and ArcFace only. A model wrapper (APPLY_MODEL) would see each CFG branch
separately and would have to edit both.

ComfyUI samples under ``torch.inference_mode()``. Autograd needs ordinary tensors, so the guidance runs under
``inference_mode(False)`` with its own copies: the VAE decoder's weights (cloned once, called through
``torch.func.functional_call``), the latent format's affine ``process_latent_out`` and the ArcFace (loaded on first
use). The ComfyUI-free maths is :class:`idglow_core.guidance.IdentityGuidance`.
"""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from idglow_core.errors import InputError
from idglow_core.guidance import GuidanceConfig, IdentityGuidance, arcface_for, arcface_path
from idglow_core.schedules import TASK_SCHEDULES
from idglow_core.training.identity import analyzer_detector

from ._comfy import CATEGORY, FaceAnalyzerType, IdsType, ScheduleType

log = logging.getLogger("idglow")


class _Decoder(torch.nn.Module):
    """Calls ``vae_model.decode`` so that ``functional_call`` can swap in the cloned weights."""

    def __init__(self, vae_model):
        super().__init__()
        self.vae = vae_model

    def forward(self, z):
        return self.vae.decode(z)


def differentiable_decoder(vae, base_model, device):
    """Internal-space latents ``[b, C, 1, h, w]`` -> RGB ``[b, 3, H, W]`` in [0, 1], differentiable. Call under
    ``inference_mode(False)``: the decoder's weights are copied once onto ``device`` (the sampling device) as
    ordinary tensors, wherever ComfyUI keeps the VAE; ComfyUI's memory manager is not asked to load the VAE
    mid-sampling (that could evict the DiT). The copy (~150 MB in bf16 for the Qwen-Image VAE decoder) lives as
    long as the guided MODEL."""
    wrapper = _Decoder(vae.first_stage_model)
    weights = {n: t.detach().to(device, copy=True) for n, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]
               if not n.startswith(("vae.encoder.", "vae.conv1."))}
    channels = base_model.latent_format.latent_channels
    with torch.no_grad():  # process_latent_out is affine per channel: out = a * z + b
        zero = torch.zeros(1, channels, 1, 1, 1)
        offset = base_model.process_latent_out(zero).clone()
        gain = (base_model.process_latent_out(zero + 1.0) - offset).clone()

    def decode(z: torch.Tensor) -> torch.Tensor:
        zz = (z * gain.to(z) + offset.to(z)).to(device=device, dtype=vae.vae_dtype)
        out = torch.func.functional_call(wrapper, weights, (zz,), strict=False)   # [b, 3, 1, H, W] in [-1, 1]
        return ((out[:, :, 0].float() + 1.0) / 2.0).clamp(0.0, 1.0).to(z.device)
    return decode


class ComfyIdentityGuidance:
    """The post-CFG function. Shared, not copied, by ``ModelPatcher.clone()`` (it holds a VAE and weights)."""

    def __init__(self, vae, ids, analyzer, config: GuidanceConfig, schedule):
        self.vae, self.ids, self.analyzer, self.config, self.schedule = vae, ids, analyzer, config, schedule
        self.core: IdentityGuidance | None = None

    def __deepcopy__(self, memo):
        return self

    def _build(self, base_model, device) -> IdentityGuidance:
        if self.core is None:
            arcface = arcface_for(self.analyzer).to(device)
            if arcface(torch.zeros(1, 3, arcface.input_size, arcface.input_size, device=device)).shape[1] != self.ids.dim:
                raise InputError(f"The identities are {self.ids.dim}-d ('{self.ids.backend}') but the ArcFace "
                                 f"of the guidance makes other embeddings. Encode the references with the same "
                                 f"insightface analyzer.")
            self.core = IdentityGuidance(self.ids.embeddings.clone().to(device), differentiable_decoder(
                self.vae, base_model, device), analyzer_detector(self.analyzer), arcface, self.config, self.schedule)
        return self.core

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        t = float(args["sigma"].flatten()[0])
        if self.config.strength * float(self.schedule(min(max(t, 0.0), 1.0))) == 0.0:
            return denoised                       # strength 0 or outside the window: untouched
        with torch.inference_mode(False):
            core = self._build(args["model"], denoised.device)
            guided = core(denoised.clone(), t)
        return guided.to(denoised.dtype)


def apply_guidance(model, vae, ids, analyzer, strength: float, margin: int, schedule=None):
    """``model.clone()`` with the guidance installed as a sampler post-CFG function."""
    arcface_path(analyzer)   # typed error now (dlib), not at the first guided step
    if ids.dim != getattr(analyzer, "embedding_dim", ids.dim) or ids.backend != getattr(analyzer, "name", ids.backend):
        raise InputError(f"The identities were encoded by '{ids.backend}' ({ids.dim}-d) but the analyzer is "
                         f"'{analyzer.name}'. Encode them with this analyzer.")
    config = GuidanceConfig(strength=float(strength), schedule=schedule, margin=int(margin))
    sched = config.resolved_schedule("group")
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(ComfyIdentityGuidance(vae, ids, analyzer, config, sched))
    log.info("IdGlow identity guidance: strength %g, schedule %s, margin %d", strength, sched.to_str(), margin)
    return patched


class IdGlowIdentityGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowIdentityGuidance", display_name="IdGlow Identity Guidance", category=CATEGORY,
            description="Training-free identity guidance: at steps where Omega(t) > 0 the sampler's x0 estimate is "
                        "decoded (face windows), its faces embedded by the differentiable ArcFace, and the estimate "
                        "moved down the gradient of the Hungarian ID loss (Eq. 3); step length strength * Omega(t). "
                        "No gradient through the DiT. Needs the insightface analyzer (buffalo_l w600k_r50.onnx).",
            inputs=[
                io.Model.Input("model", tooltip="A Qwen-Image(-Edit) MODEL, with or without IdGlow Apply. Cloned."),
                io.Vae.Input("vae", tooltip="The VAE of the graph: decodes the estimate's face windows."),
                IdsType.Input("ids", tooltip="Identities from IdGlow Multi-ID Encode (insightface analyzer)."),
                FaceAnalyzerType.Input("analyzer", tooltip="The insightface analyzer: detects faces (no gradient) and "
                                                           "provides the ArcFace ONNX."),
                io.Float.Input("strength", default=1.0, min=0.0, max=20.0, step=0.05,
                               tooltip="L2 length of each step in latent units at Omega(t) = 1. 0 = off "
                                       "(bit-identical sampling)."),
                io.Int.Input("margin", default=4, min=0, max=64,
                             tooltip="Latent cells decoded around each face window (larger = closer to a full decode)."),
                ScheduleType.Input("schedule", optional=True,
                                   tooltip="Omega(t) window (IdGlow Schedule). Unconnected: the group task's "
                                           f"{TASK_SCHEDULES['group'].to_str()}."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The guided copy; connect to KSampler or "
                                                                   "IdGlow Seed Search.")])

    @classmethod
    def execute(cls, model, vae, ids, analyzer, strength, margin, schedule=None) -> io.NodeOutput:
        return io.NodeOutput(apply_guidance(model, vae, ids, analyzer, strength, margin, schedule))
