"""Turning validated samples into the tensors a step needs, with an optional on-disk cache.

Per sample (all on the CPU, no batch dim)::

    latents         [C, 1, h, w]      target, VAE-encoded (mode) and normalised
    ref_latents     k x [C, 1, h_j, w_j]   references at the VAE size the pipeline uses
    prompt_embeds   [L, D]            Qwen2.5-VL embeddings of the prompt with the reference images
    prompt_mask     [L]               1 = real token
    id_embeds       [k, id_dim]       face-analyzer embeddings of the references (the adapter's input)
    ref_face_embeds [k, D_arc]        torch-ArcFace embeddings of the references (the ID loss's targets)

With ``data.cache_dir`` set, the latents and prompt embeddings of each sample are written once as
``<hash>.safetensors`` and read back on later runs (the hash covers the files' contents, the prompt, the sizes
and the model); without it, encodings are kept in memory. Either way the text encoder and the VAE encoder run
once per sample. ``id_embeds`` and ``ref_face_embeds`` are never cached on disk: they depend on this run's face
backend and ID-loss encoder (a cache shared by a dlib and an insightface run, or by a run without and one with
the ID loss, must not hand one the other's embeddings), and they are cheap to recompute.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..images import load_image
from .data import Sample, fit_area
from .identity import IdentityLoss
from .safety import read_cache_entry

__all__ = ["SampleEncoder", "collate", "pipeline_areas", "encode_samples"]

log = logging.getLogger("idglow")


def pipeline_areas() -> tuple[int, int]:
    """(condition-image area for the VLM, reference area for the VAE) that QwenImageEditPlusPipeline uses:
    384 x 384 and 1024 x 1024 pixels."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    return mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE


class SampleEncoder:
    """Encodes :class:`Sample` objects with a pipeline's VAE and text encoder (no grad), memoised."""

    def __init__(self, pipe, identity: IdentityLoss | None, resolution: int, cache_dir: str | Path = "",
                 model_tag: str = "", areas: tuple[int, int] | None = None):
        self.pipe, self.identity, self.resolution = pipe, identity, resolution
        self.areas = areas or pipeline_areas()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_tag = model_tag
        self._memory: dict[int, dict[str, torch.Tensor]] = {}

    def _key(self, s: Sample) -> str:
        h = hashlib.sha256()
        for p in [s.target, *s.refs]:
            h.update(Path(p).read_bytes())
        cond, vae = self.areas
        h.update(json.dumps([s.prompt, self.resolution, cond, vae, self.model_tag]).encode())
        return h.hexdigest()[:32]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        h, w = image.shape[:2]
        x = self.pipe.image_processor.preprocess(Image.fromarray(image), h, w)  # [1, 3, H, W] in [-1, 1]
        x = x.to(device=vae.device, dtype=vae.dtype)[:, :, None]
        lat = vae.encode(x).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
        return ((lat - mean) / std)[0].float().cpu()

    @torch.no_grad()
    def _encode(self, s: Sample) -> dict[str, torch.Tensor]:
        cond_area, vae_area = self.areas
        target = fit_area(load_image(s.target), self.resolution * self.resolution)
        refs = [load_image(r) for r in s.refs]
        cond = [Image.fromarray(fit_area(r, cond_area)) for r in refs]
        device = self.pipe.text_encoder.device
        pe, pm = self.pipe.encode_prompt(prompt=[s.prompt], image=cond, device=device)
        pm = torch.ones(pe.shape[:2], dtype=torch.long) if pm is None else pm
        out = {"latents": self.encode_image(target), "prompt_embeds": pe[0].float().cpu(),
               "prompt_mask": pm[0].long().cpu()}
        for j, r in enumerate(refs):
            out[f"ref_latents.{j}"] = self.encode_image(fit_area(r, vae_area))
        return out

    @torch.no_grad()
    def _identities(self, s: Sample) -> dict[str, torch.Tensor]:
        """The run-specific part: this run's face-analyzer embeddings and, with the ID loss, the references
        embedded by its ArcFace (both depend on the face models, which the cache key does not cover)."""
        out = {"id_embeds": torch.from_numpy(np.stack([f.embedding for f in s.ref_faces])).float()}
        if self.identity is not None:
            embs = [self.identity.reference_embeddings(load_image(r), [f.kps]) for r, f in zip(s.refs, s.ref_faces)]
            out["ref_face_embeds"] = torch.cat(embs).float().cpu()
        return out

    def __call__(self, index: int, sample: Sample) -> dict[str, torch.Tensor]:
        if index in self._memory:
            return self._memory[index]
        path = self.cache_dir / f"{self._key(sample)}.safetensors" if self.cache_dir else None
        enc = read_cache_entry(path, ("latents", "prompt_embeds", "prompt_mask"))  # None: missing or damaged
        if enc is None:
            enc = self._encode(sample)
            if path is not None:
                from safetensors.torch import save_file
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
                save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp))
                tmp.replace(path)
        enc = {k: v for k, v in enc.items() if k not in ("id_embeds", "ref_face_embeds")}  # files of older versions
        enc.update(self._identities(sample))
        self._memory[index] = enc
        return enc

    def encode_all(self, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
        """Encode every sample (cache hits are read back); returns the list the training loop indexes."""
        return [self(i, s) for i, s in enumerate(samples)]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack encoded samples into a batch. Prompts are right-padded (mask 0); targets, references and their
    count must agree across the batch (use data.batch_size 1, or bucket the manifest by size)."""
    keys = sorted((k for k in items[0] if k.startswith("ref_latents.")), key=lambda k: int(k.split(".")[1]))
    shapes = {(tuple(it["latents"].shape), tuple(tuple(it[k].shape) for k in keys),
               tuple(sorted(k for k in it if k.startswith("ref_latents.")))) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"Samples in one batch differ in size or number of references ({len(shapes)} kinds). "
                          f"Use data.batch_size=1 with gradient accumulation, or bucket the manifest by size.")
    length = max(it["prompt_embeds"].shape[0] for it in items)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0) * (x.ndim - 1) + (0, length - x.shape[0]))

    batch = {"latents": torch.stack([it["latents"] for it in items]),
             "ref_latents": [torch.stack([it[k] for it in items]) for k in keys],
             "prompt_embeds": torch.stack([pad(it["prompt_embeds"]) for it in items]),
             "prompt_mask": torch.stack([pad(it["prompt_mask"]) for it in items]),
             "id_embeds": torch.stack([it["id_embeds"] for it in items]),
             "id_mask": torch.ones(len(items), items[0]["id_embeds"].shape[0], dtype=torch.bool)}
    if "ref_face_embeds" in items[0]:
        batch["ref_face_embeds"] = [it["ref_face_embeds"] for it in items]
    return batch


def encode_samples(cfg, pipe, samples: Sequence[Sample], identity: IdentityLoss | None) -> list[dict[str, torch.Tensor]]:
    """Encode every sample of a run (``cfg``: a TrainConfig) with the sizes and cache it asks for."""
    default_cond, default_ref = pipeline_areas()
    areas = (cfg.data.condition_area or default_cond, cfg.data.ref_area or default_ref)
    encoder = SampleEncoder(pipe, identity, cfg.data.resolution, cfg.data.cache_dir,
                            model_tag=cfg.model.pretrained or f"tiny-{cfg.run.seed}", areas=areas)
    return encoder.encode_all(samples)
