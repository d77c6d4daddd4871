"""Identity without an adapter: IdGlow Select Best (Hungarian best-of-N) and IdGlow Seed Search (early pruning).

Seed search uses ComfyUI's own sampling (``comfy.sample.sample_custom``) with the KSampler's sigmas split at step
k (:func:`idglow_core.seedsearch.split_step`): phase 1 runs each candidate seed over ``sigmas[:k+1]`` and keeps
the sampler's x0 estimate of its last step (the callback's ``denoised``); only those estimates are VAE-decoded
and scored; phase 2 continues the best M from their latents over ``sigmas[k:]`` without new noise, the way
KSamplerAdvanced resumes a split. Candidate i is seed ``seed + i``: with M = N each finished latent is what a
KSampler with that seed gives (exactly for one-step samplers such as euler; multistep samplers restart their
history at the split, ancestral ones draw fresh noise in phase 2).
"""
from __future__ import annotations

import json
import logging

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from idglow_core.bestof import rank_candidates, ranking_report, score_candidates
from idglow_core.errors import InputError
from idglow_core.seedsearch import check_search, split_step, step_accounting

from ._comfy import CATEGORY, FaceAnalyzerType, IdsType, progress
from ._convert import check_choice, image_batch_to_numpy

log = logging.getLogger("idglow")


def _decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """LATENT samples -> IMAGE ``[B, H, W, 3]`` (as VAEDecode: 5-D video output is flattened)."""
    with torch.no_grad():
        images = vae.decode(latent)
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images


def seed_search(model, positive, negative, latent: dict, vae, ids, analyzer, seed: int, candidates: int,
                keep: int, prune_at: float, steps: int, cfg: float, sampler_name: str, scheduler: str):
    """Returns ``(finished LATENT dict [keep, ...] best first, report str, ranking list, accounting dict)``."""
    check_search(candidates, keep, prune_at)
    check_choice("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS)
    check_choice("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)
    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if image.shape[0] != 1:
        raise InputError(f"Seed search takes a latent batch of 1 (got {image.shape[0]}): the candidates are the "
                         f"seeds seed .. seed + N - 1. Use an Empty Latent with batch_size 1.")
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    k = split_step(sigmas, prune_at)
    sampler = comfy.samplers.sampler_object(sampler_name)
    mask = latent.get("noise_mask")
    tick = progress(candidates * k + keep * (steps - k))
    paused, estimates = [], []
    for i in range(candidates):
        noise = comfy.sample.prepare_noise(image, seed + i, latent.get("batch_index"))
        seen = {}

        def callback(step, x0, x, total, seen=seen):
            tick()
            if step == k - 1:
                seen["x0"] = x0
        paused.append(comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas[:k + 1], positive, negative,
                                                 image, noise_mask=mask, callback=callback, disable_pbar=True,
                                                 seed=seed + i))
        estimates.append(model.model.process_latent_out(seen["x0"].to(torch.float32)).cpu())
    pixels = _decode(vae, torch.cat(estimates))                          # only the N estimates are decoded
    ranked = rank_candidates(score_candidates(analyzer, ids.embeddings, image_batch_to_numpy(pixels, "estimate")))
    finished = []
    for s in ranked[:keep]:
        if k == steps:
            finished.append(paused[s.index])
            continue
        finished.append(comfy.sample.sample_custom(
            model, torch.zeros_like(paused[s.index]), cfg, sampler, sigmas[k:], positive, negative,
            paused[s.index], noise_mask=mask, callback=lambda *a: tick(), disable_pbar=True, seed=seed + s.index))
    acc = {**step_accounting(candidates, keep, steps, k), "prune_at": prune_at, "t_at_split": float(sigmas[k - 1]),
           "shift": getattr(ms, "shift", None), "sigmas": [round(float(v), 4) for v in sigmas]}
    shift = "" if acc["shift"] is None else f", shift {float(acc['shift']):.3g}"
    report = (f"t_p = {prune_at:g} is step {k} of {steps} (sigma {acc['t_at_split']:.4f} under this model's "
              f"sampling{shift}): {candidates} x {k} + {keep} x {steps - k} = {acc['pruned_steps']} sample-steps "
              f"({acc['ratio']:.3f} of full best-of-{candidates})\n" + ranking_report(ranked, "seed", first=seed))
    out = {"samples": torch.cat(finished)}
    log.info("IdGlow seed search: %s", report.replace("\n", " | "))
    return out, report, [{**s.to_dict(), "seed": seed + s.index} for s in ranked], acc


class IdGlowSeedSearch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowSeedSearch", display_name="IdGlow Seed Search", category=CATEGORY, is_output_node=True,
            description="Runs N seeds to the flow time t_p, decodes each one-step estimate, ranks them by Hungarian "
                        "FaceSim against the identities and finishes only the best M. Works with the plain "
                        "Qwen-Image-Edit graph (no adapter) and with IdGlow Apply.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to sample (after ModelSampling / IdGlow nodes)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (e.g. TextEncodeQwenImageEditPlus)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="The starting latent, batch 1 (Empty Latent / edit latent)."),
                io.Vae.Input("vae", tooltip="Decodes the candidates' estimates at t_p for scoring."),
                IdsType.Input("ids", tooltip="Reference identities (IdGlow Multi-ID Encode)."),
                FaceAnalyzerType.Input("analyzer", tooltip="The analyzer that encoded the identities."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Candidate i uses seed + i (the same image a KSampler with that seed gives)."),
                io.Int.Input("candidates", default=8, min=1, max=64, tooltip="N seeds to start."),
                io.Int.Input("keep", default=2, min=1, max=64, tooltip="M best candidates to finish."),
                io.Float.Input("prune_at", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="Flow time t_p (1 = noise, 0 = clean) at which the estimates are scored. "
                                       "With a shift near 3 most steps lie above t = 0.5; the report says which "
                                       "step t_p is."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps, as in KSampler."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale, as in KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler. One-step samplers (euler) split exactly; multistep "
                                       "ones restart their history at t_p."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Sigma schedule, as in KSampler."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The M finished latents, best first."),
                     io.String.Output(display_name="report", tooltip="Split step, step accounting and ranking."),
                     io.Int.Output(display_name="best_seed", tooltip="The seed of the best candidate.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, vae, ids, analyzer, seed, candidates, keep, prune_at,
                steps, cfg, sampler_name, scheduler) -> io.NodeOutput:
        out, report, ranking, _ = seed_search(model, positive, negative, latent_image, vae, ids, analyzer, seed,
                                              candidates, keep, prune_at, steps, cfg, sampler_name, scheduler)
        return io.NodeOutput(out, report, int(ranking[0]["seed"]), ui={"text": [report]})


class IdGlowSelectBest(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowSelectBest", display_name="IdGlow Select Best", category=CATEGORY, is_output_node=True,
            description="Hungarian best-of-N: ranks a batch of images by count_ok (as many faces as identities), "
                        "then strict FaceSim, then ID-Conf, and returns the best K.",
            inputs=[
                io.Image.Input("images", tooltip="Candidate images (a batch, e.g. VAE Decode of a batched KSampler)."),
                IdsType.Input("ids", tooltip="Reference identities (IdGlow Multi-ID Encode)."),
                FaceAnalyzerType.Input("analyzer", tooltip="The analyzer that encoded the identities."),
                io.Int.Input("keep", default=1, min=1, max=64, tooltip="How many of the best images to output."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The best K images, best first."),
                     io.String.Output(display_name="scores", tooltip="JSON: every candidate's scores, best first."),
                     io.String.Output(display_name="report", tooltip="One line per candidate, best first.")])

    @classmethod
    def execute(cls, images, ids, analyzer, keep) -> io.NodeOutput:
        arrays = image_batch_to_numpy(images, "images")
        ranked = rank_candidates(score_candidates(analyzer, ids.embeddings, arrays, on_image=progress(len(arrays))))
        best = images[[s.index for s in ranked[:keep]]]
        report = ranking_report(ranked, "image")
        scores = json.dumps([s.to_dict() for s in ranked])
        return io.NodeOutput(best, scores, report, ui={"text": [report]})
