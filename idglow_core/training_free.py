"""Identity without an adapter, in :class:`~idglow_core.pipeline.IdGlowPipeline`: best-of-N, seed search with
early pruning and identity guidance (``GenerateConfig.candidates / keep / prune_at / id_guidance``).

Candidates are seeds ``seed .. seed + N - 1`` (candidate i is the image a single run with seed ``seed + i``
gives), batched in one pipeline call. Without ``prune_at`` all N run to the end and the final images are ranked
(:mod:`idglow_core.bestof`); with it, phase 1 runs the N to step k (:func:`~idglow_core.seedsearch.split_step`),
decodes their one-step estimates, ranks them, and phase 2 finishes the best ``keep`` from their latents with the
tail of the same sigma schedule. ``sequential=True`` runs each candidate in its own pipeline call (batch 1, as
the ``IdGlowSeedSearch`` node does): the same images, memory of one candidate, and wall time that follows the
step accounting where a batch of N costs N times a batch of 1 (a DiT that is compute-bound).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch

from .bestof import rank_candidates, ranking_report, score_candidates
from .errors import InputError
from .seedsearch import DiffusersStepHook, step_accounting

__all__ = ["run_training_free", "output_size"]

log = logging.getLogger("idglow")


def output_size(pipe, refs: list[np.ndarray], height: int | None, width: int | None) -> tuple[int, int]:
    """The ``(height, width)`` QwenImageEditPlusPipeline generates: ~1 MP at the last reference's aspect ratio
    unless given, rounded down to a multiple of 2 * vae_scale_factor."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    h0, w0 = refs[-1].shape[:2]
    cw, ch = calculate_dimensions(1024 * 1024, w0 / h0)
    m = pipe.vae_scale_factor * 2
    return (height or ch) // m * m, (width or cw) // m * m


@contextlib.contextmanager
def _encoding_once(pipe) -> Iterator[None]:
    """Every pipeline call of one search reuses the first call's encodings (the VLM reads the same prompt and
    reference images; the VAE encodes the same references, deterministically by ``argmax``):
    ``pipe._get_qwen_prompt_embeds`` is cached per prompt and ``pipe._encode_vae_image`` per image tensor
    (compared by value) for the duration of the search."""
    original_prompt, original_vae, prompts, images = pipe._get_qwen_prompt_embeds, pipe._encode_vae_image, {}, []

    def cached_prompt(prompt, image=None, device=None, dtype=None):
        key = repr(prompt)
        if key not in prompts:
            prompts[key] = original_prompt(prompt, image, device, dtype)
        return prompts[key]

    def cached_vae(image, generator):
        for seen, latents in images:
            if seen.shape == image.shape and seen.dtype == image.dtype and torch.equal(seen, image):
                return latents
        images.append((image.clone(), original_vae(image=image, generator=generator)))
        return images[-1][1]
    pipe._get_qwen_prompt_embeds, pipe._encode_vae_image = cached_prompt, cached_vae
    try:
        yield
    finally:
        del pipe._get_qwen_prompt_embeds, pipe._encode_vae_image


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    from .training.sft import vae_decoder

    with torch.no_grad():
        return vae_decoder(pipe.vae)(latents.to(pipe.vae.device))


def _uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    arr = (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


def _guidance(ip, refs: list[np.ndarray], cfg):
    from .guidance import IdentityGuidance, arcface_for, guidance_references
    from .training.identity import analyzer_detector
    from .training.sft import vae_decoder

    if ip.detector is None and ip.analyzer is None:
        raise InputError("Identity guidance needs a face detector: build IdGlowPipeline with an analyzer "
                         "(insightface) or detector=.")
    detect = ip.detector or analyzer_detector(ip.analyzer)
    if ip.arcface is None:
        ip.arcface = arcface_for(ip.analyzer)
    ip.arcface.to(ip.pipe.vae.device)
    emb = guidance_references(refs, detect, ip.arcface)
    return IdentityGuidance(emb, vae_decoder(ip.pipe.vae), detect, ip.arcface, cfg.id_guidance,
                            cfg.id_guidance.resolved_schedule(cfg.task))


def _score(ip, refs: list[np.ndarray], images: list[np.ndarray]):
    from .faces import reference_faces

    if ip.analyzer is None:
        raise InputError("Best-of-N / seed search scores candidates with a face analyzer: build IdGlowPipeline "
                         "with analyzer= (idglow_core.faces.load_analyzer).")
    ref_emb = np.stack([f.embedding for f in reference_faces(ip.analyzer, refs)])
    return rank_candidates(score_candidates(ip.analyzer, ref_emb, images))


def run_training_free(ip, refs: list[np.ndarray], cfg, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """Returns the kept images ``[keep, 3, H, W]`` in [0, 1] (best first) and metadata: search (accounting,
    ranking), per-step log (t, rows, seconds, ID loss) and guidance records."""
    pipe, n, m = ip.pipe, cfg.candidates, cfg.keep
    height, width = output_size(pipe, refs, cfg.height, cfg.width)
    kwargs = {**kwargs, "height": height, "width": width}
    guidance = _guidance(ip, refs, cfg) if cfg.id_guidance is not None else None
    gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + i) for i in range(n)]
    meta: dict[str, Any] = {"seeds": [cfg.seed + i for i in range(n)], "candidates": n, "keep": m,
                            "sequential": bool(cfg.sequential)}
    start = time.perf_counter()
    with _encoding_once(pipe):
        pixels, steps_log = _run_phases(ip, refs, cfg, kwargs, (height, width), gens, guidance, meta)
    meta["kept_seeds"] = [cfg.seed + s["index"] for s in meta.get("ranking", [])][:m] or meta["seeds"][:m]
    meta["steps_log"] = steps_log
    meta["seconds"] = round(time.perf_counter() - start, 4)
    if guidance is not None:
        meta["guidance"] = {"config": {"strength": cfg.id_guidance.strength,
                                       "margin": cfg.id_guidance.margin},
                            "schedule": guidance.schedule.to_dict(), "steps": [r.to_dict() for r in guidance.records]}
    return pixels, {"training_free": meta}


def _calls(pipe, groups: list[list[int]], make_hook, call) -> tuple[torch.Tensor, list]:
    """One pipeline call per group of candidate indices (all of them batched, or one each): ``call(group)`` gives
    that call's extra arguments. Returns the outputs concatenated in group order and the (group, hook) pairs."""
    images, hooks = [], []
    for group in groups:
        hook = make_hook()
        with hook:
            images.append(pipe(**call(group), callback_on_step_end=hook.callback).images)
        hooks.append((group, hook))
    return torch.cat(images), hooks


def _log(hooks, offset: int = 0) -> list[dict]:
    """The per-step logs of the calls, in call order; ``candidates`` names the rows of each call."""
    return [{**e, "step": e["step"] + offset, "candidates": group} for group, hook in hooks for e in hook.log]


def _run_phases(ip, refs, cfg, kwargs, size, gens, guidance, meta):
    """One call (full best-of-N) or phase 1 + scoring + phase 2 (seed search), all N candidates batched or
    (``cfg.sequential``) one per call; fills ``meta``."""
    pipe, n, m, prune = ip.pipe, cfg.candidates, cfg.keep, cfg.prune_at is not None
    (height, width), groups = size, (lambda idx: [[i] for i in idx] if cfg.sequential else [list(idx)])
    images, hooks = _calls(pipe, groups(range(n)),
                           lambda: DiffusersStepHook(pipe, height, width, guidance, prune_at=cfg.prune_at),
                           lambda g: {**kwargs, "num_images_per_prompt": len(g), "generator": [gens[i] for i in g],
                                      "output_type": "latent" if prune else "pt"})
    steps_log = _log(hooks)
    if not prune:
        pixels = images
        if n > 1:
            scoring = time.perf_counter()
            ranked = _score(ip, refs, _uint8(pixels))
            meta["score_seconds"] = round(time.perf_counter() - scoring, 4)
            pixels = pixels[[s.index for s in ranked[:m]]]
            meta["ranking"] = [s.to_dict() for s in ranked]
            log.info("best-of-%d:\n%s", n, ranking_report(ranked))
        meta["accounting"] = step_accounting(n, n, cfg.steps, cfg.steps)
        return pixels, steps_log
    first, k = hooks[0][1], hooks[0][1].split
    scoring = time.perf_counter()
    x0 = torch.cat([hook.x0 for _, hook in hooks])
    estimates = _uint8(_decode(pipe, first.unpack(x0)))              # the one-step estimates at step k
    ranked = _score(ip, refs, estimates)
    meta["score_seconds"] = round(time.perf_counter() - scoring, 4)
    keep = [s.index for s in ranked[:m]]
    log.info("seed search: scored %d estimates at step %d of %d (t=%.4f), keeping %s\n%s", n, k, cfg.steps,
             steps_log[k - 1]["t"], [cfg.seed + i for i in keep], ranking_report(ranked))
    tail = list(np.linspace(1.0, 1.0 / cfg.steps, cfg.steps)[k:])  # the pipeline's unshifted sigmas, after step k
    pixels, hooks2 = _calls(pipe, groups(keep), lambda: DiffusersStepHook(pipe, height, width, guidance),
                            lambda g: {**kwargs, "num_inference_steps": cfg.steps - k, "sigmas": tail,
                                       "latents": images[g], "num_images_per_prompt": len(g), "output_type": "pt"})
    meta["ranking"] = [s.to_dict() for s in ranked]
    meta["accounting"] = {**step_accounting(n, m, cfg.steps, k), "prune_at": cfg.prune_at,
                          "t_at_split": steps_log[k - 1]["t"]}
    return pixels, steps_log + _log(hooks2, offset=k)
