"""SFT with dynamic identity-loss modulation (paper §3.3, Algorithm 1).

    L = ||v - (eps - z0)||^2 + Omega(t) * lambda_base * L_ID(decode(z_t - t v), refs)          # Eq. 1

The ID loss (Eq. 2-3) runs only for samples whose ``Omega(t) * lambda_base`` is non-zero: the others skip the
VAE decode entirely. Each sample's manifest ``task`` picks its Omega: ``group`` anneal (Eq. 4), ``age`` gate
(Eq. 5), so one run can mix both; ``loss.schedule`` overrides it for all (``constant`` is the "constant ID
loss" ablation), ``loss.id_weight=0`` the "w/o ID loss" one. The ID residual is injected with the same
Omega(t) the pipeline and the nodes deploy (``loss.injection=schedule``; ``constant`` = strength 1).

    from idglow_core.training import load_config, run_sft
    result = run_sft(load_config("train/configs/tiny_cpu.yaml"))
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed

from ..adapter import TRAIN_INJECTION_KEY
from ..losses import add_noise, flow_loss, one_step_estimate, sample_timesteps, sft_objective, velocity_target
from .config import LossConfig, TrainConfig
from .identity import IdentityLoss, analyzer_detector, tiny_arcface
from .loop import LoopParts, LoopResult, StepOutput, check_run, claim, make_accelerator, run_loop

__all__ = ["SFTStep", "run_sft", "vae_decoder", "build_identity_loss", "draw_t_and_noise"]

log = logging.getLogger("idglow")
REPO_PHOTOS = ("obama.jpg", "biden.jpg", "obama2.jpg", "obama3.jpg")


def vae_decoder(vae, tiled: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised latents ``[b, C, 1, h, w]`` -> RGB ``[b, 3, H, W]`` in [0, 1], differentiable (VAE frozen).

    ``tiled``: latents larger than the VAE's tile (``tile_sample_min_*`` / spatial factor) go through its
    ``tiled_decode`` (bounded memory, blended seams); meant for the no-grad detection decode of ``id_decode=crop``.
    """
    def decode(z: torch.Tensor) -> torch.Tensor:
        c = vae.config
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=z.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
        z = z.to(vae.dtype) * std + mean
        f = vae.spatial_compression_ratio
        if tiled and (z.shape[-2] > vae.tile_sample_min_height // f or z.shape[-1] > vae.tile_sample_min_width // f):
            x = vae.tiled_decode(z, return_dict=False)[0][:, :, 0]
        else:
            x = vae.decode(z, return_dict=False)[0][:, :, 0]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return decode


def draw_t_and_noise(loss: LossConfig, z0: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 lines 3-4: t ``[B]`` from ``loss``'s timestep scheme and eps like ``z0``, both from
    ``generator`` (so a resumed run draws the same), moved to ``z0``'s device."""
    t = sample_timesteps(z0.shape[0], scheme=loss.timestep_scheme, logit_mean=loss.logit_mean,
                         logit_std=loss.logit_std, shift=loss.timestep_shift, generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    return t.to(z0.device), eps.to(device=z0.device, dtype=z0.dtype)


class SFTStep:
    """One SFT micro-step: ``(module, batch, generator) -> StepOutput`` for :func:`run_loop`.

    ``decode``: latents -> [0, 1] images (needed when the ID loss is on); ``identity``: the Eq. 3 loss or None;
    ``detect_decode``: the no-grad decode used for face detection when ``loss.id_decode == "crop"`` (default
    ``decode``; e.g. ``vae_decoder(vae, tiled=True)``).
    """

    def __init__(self, loss: LossConfig, decode: Callable[[torch.Tensor], torch.Tensor] | None,
                 identity: IdentityLoss | None, detect_decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg, self.decode, self.identity, self.detect_decode = loss, decode, identity, detect_decode
        self.counts = {"samples": 0, "id_loss_ran": 0, "images_without_face": 0, "refs_missing": 0}

    def __call__(self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        device = next(module.parameters()).device
        z0 = batch["latents"].to(device)
        t, eps = draw_t_and_noise(self.cfg, z0, generator)                            # Algorithm 1 line 3
        z_t = add_noise(z0, eps, t)                                    # line 4
        tasks = batch.get("task")                                      # each sample's own task (None: loss.task)
        inject = self.cfg.injection_scale(tasks, t)                    # [B] Omega_task(t) as deployed, or 1
        v = module(z_t, t, [r.to(device) for r in batch["ref_latents"]], batch["prompt_embeds"].to(device),
                   batch["prompt_mask"].to(device), batch["id_embeds"].to(device), batch["id_mask"].to(device),
                   inject)
        flow = flow_loss(v, velocity_target(z0, eps))                  # line 6, Eq. 1 first term, [B]
        omega = self.cfg.omega_per_sample(tasks, t).to(flow)           # lines 7-12, Eq. 4/5 per sample
        active = (omega * self.cfg.id_weight) != 0
        id_per = torch.zeros_like(flow)
        logs: dict[str, Any] = {"loss/flow": flow.mean().item(), "omega/mean": omega.mean().item(),
                                "inject/scale": inject.mean().item(),
                                "id_loss/active_frac": active.float().mean().item()}
        if self.identity is not None and bool(active.any()):
            idx = active.nonzero().flatten()
            z0_hat = one_step_estimate(z_t[idx], v[idx], t[idx])         # line 13
            refs = [batch["ref_face_embeds"][i] for i in idx.tolist()]
            if self.cfg.id_decode == "crop":                          # line 14, decoding only the faces' windows
                res = self.identity.on_latents(z0_hat, self.decode, refs, self.cfg.id_crop_margin, self.detect_decode)
            else:                                                      # line 14, decoding the whole estimate
                res = self.identity(self.decode(z0_hat), refs)
            id_per = id_per.index_put((idx,), res.loss.to(id_per.dtype))
            values = res.loss.detach().float().tolist()
            logs["loss/id"] = values
            for ti, value in zip(t[idx].tolist(), values):
                logs.setdefault(f"loss/id/t_bin_{min(int(ti * 10), 9)}", []).append(value)
            logs["faces/missing_frac"] = [1.0] * sum(res.missing) + [0.0] * (sum(res.refs) - sum(res.missing))
            self.counts["id_loss_ran"] += len(values)
            self.counts["images_without_face"] += sum(1 for f in res.faces if f == 0)
            self.counts["refs_missing"] += sum(res.missing)
        self.counts["samples"] += flow.shape[0]
        loss = sft_objective(flow, omega, id_per, self.cfg.id_weight)  # line 15, Eq. 1
        return StepOutput(loss=loss, logs=logs)


def default_photos() -> list[Path]:
    root = Path(__file__).resolve().parents[2] / "tests" / "data"
    return [root / name for name in REPO_PHOTOS if (root / name).is_file()]


def build_identity_loss(cfg: TrainConfig, analyzer, detector=None, arcface=None) -> IdentityLoss | None:
    """The Eq. 3 loss for this run, or None when ``loss.id_weight == 0``. ``model.arcface_onnx``: a
    w600k_r50.onnx path, ``tiny`` (random stand-in, smoke runs), or empty = the insightface model folder."""
    if cfg.loss.id_weight == 0 and arcface is None:
        return None
    if arcface is None:
        source = cfg.model.arcface_onnx
        if source == "tiny":
            arcface = tiny_arcface()
        else:
            from ..errors import ModelNotFoundError
            from ..faces.arcface import ArcFace
            if not source:
                folder = getattr(analyzer, "folder", None)  # InsightFaceAnalyzer: the buffalo_l folder
                source = str(Path(folder) / "w600k_r50.onnx") if folder else ""
            if not source or not Path(source).is_file():
                raise ModelNotFoundError(f"The ID loss needs ArcFace weights: set model.arcface_onnx to "
                                         f"w600k_r50.onnx (buffalo_l), use 'tiny' for a smoke run, or set "
                                         f"loss.id_weight=0. Looked for '{source}'.")
            arcface = ArcFace.from_onnx(source)
    return IdentityLoss(detector or analyzer_detector(analyzer), arcface, cfg.loss.missing_face_value)


def _manifest(cfg: TrainConfig, acc) -> Path:
    if cfg.data.manifest:
        return Path(cfg.data.manifest)
    from .data import write_synthetic_manifest

    folder = Path(cfg.run.output_dir) / "synthetic"
    if acc.is_main_process:
        photos = cfg.data.synthetic_photos or default_photos()
        write_synthetic_manifest(folder, cfg.data.synthetic, photos, task=cfg.loss.task,
                                 size=max(160, cfg.data.resolution))
    acc.wait_for_everyone()
    return folder / "manifest.jsonl"


def run_sft(cfg: TrainConfig, *, analyzer=None, detector=None, arcface=None, accelerator=None) -> LoopResult:
    """Validate data, build models, train, checkpoint and export. Injectable for tests: ``analyzer`` (face
    analyzer for references), ``detector`` (keypoints on decoded images), ``arcface`` (ID-loss encoder)."""
    from ..faces import load_analyzer
    from .data import TaskTagged, read_manifest, with_tasks
    from .encode import collate, encode_samples, free_text_encoder, sample_encoder, shard_needs_encoding
    from .export import export_weights
    from .models import build_pipeline, build_train_module

    acc = accelerator or make_accelerator(cfg)
    plan = check_run(cfg, acc, start_weights={"model.init_adapter": cfg.model.init_adapter}, trainer="idglow-sft")
    analyzer = analyzer or load_analyzer(cfg.model.face_backend, model_dir=cfg.model.face_model_dir or None)
    samples = read_manifest(_manifest(cfg, acc), analyzer, max_ids=cfg.model.max_ids)
    identity = build_identity_loss(cfg, analyzer, detector, arcface)
    probe = sample_encoder(cfg, None, identity)  # a rerun on a full cache needs no text encoder
    pipe = build_pipeline(cfg, text_encoder=shard_needs_encoding(samples, probe.is_cached, acc))
    pipe.to(acc.device)
    encoded = TaskTagged(encode_samples(cfg, pipe, samples, identity, accelerator=acc),  # on disk, loaded lazily
                         [s.task for s in samples])
    free_text_encoder(pipe)  # prompts are encoded: give its memory back before training
    if identity is not None:
        identity.arcface.to(acc.device)
    set_seed(cfg.run.seed)  # same adapter / LoRA initialisation on every rank and in every rerun
    module = build_train_module(cfg, pipe, id_dim=int(encoded[0]["id_embeds"].shape[1]))
    crop = cfg.loss.id_decode == "crop"
    step = SFTStep(cfg.loss, vae_decoder(pipe.vae), identity, vae_decoder(pipe.vae, tiled=True) if crop else None)
    meta = {"task": cfg.loss.task, "trained_steps": str(cfg.optim.max_steps), "trainer": "idglow-sft",
            TRAIN_INJECTION_KEY: json.dumps(cfg.loss.train_injection([s.task for s in samples]))}
    validator = None
    if cfg.run.validate_every:
        from .validate import FaceSimValidator
        validator = FaceSimValidator(encoded[: cfg.run.validate_samples], with_tasks(collate), vae_decoder(pipe.vae),
                                     analyzer, steps=cfg.run.validate_steps, seed=cfg.run.seed,
                                     out_dir=Path(cfg.run.output_dir) / "validation",
                                     injection=cfg.loss.injection_scale)
    parts = LoopParts(module=module, samples=encoded, collate=with_tasks(collate), step_fn=step,
                      export=lambda m, folder, state: export_weights(m, folder, cfg.run.train, meta, state),
                      validate=validator)
    result = run_loop(cfg, parts, resume_from=claim(plan, cfg, acc), accelerator=acc)  # all checks passed
    c = step.counts
    log.info("ID loss ran on %d of %d samples (this process); %d decoded estimates had no face, %d references "
             "unmatched (each counted as %.2f)", c["id_loss_ran"], c["samples"], c["images_without_face"],
             c["refs_missing"], cfg.loss.missing_face_value)
    return result
