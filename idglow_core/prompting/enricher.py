"""The Image-Edit-Prompt model M_P (paper §3.2, Fig. 3): reference images + a task instruction -> a precise prompt.

A VLM receives a structured system prompt with spatial instructions ("Picture 1 is the person on the left"),
the k reference images and the user's instruction, and writes one prompt that names every subject with its
position, appearance attributes, lighting and interaction. Decoding is greedy by default. A validator checks
the result; on failure the enricher retries once with seeded sampling, then falls back to the static template
(``static_prompt``) with a logged warning. ``EnrichResult.source`` says which of the three it was.

    vlm = load_vlm("models/LLM/Qwen3-VL-8B-Instruct", dtype="bf16", device="cuda")
    result = enrich_prompt(vlm, [img1, img2], "a beach picnic at sunset", task="group")
    result.prompt, result.source            # -> "...", "vlm" | "vlm_retry" | "static"
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError
from ..images import to_rgb_uint8
from .templates import TASKS, subject_positions, static_prompt
from .vlm import VLMBundle

log = logging.getLogger("idglow")

__all__ = ["EnrichConfig", "Attempt", "EnrichResult", "build_messages", "check_prompt", "enrich_prompt",
           "enrich_prompt_from_tensors"]

_TASK_RULES = {
    "group": "Keep every person's face, hairstyle, skin tone and apparent age exactly as in their picture.",
    "age": ("Turn every person into a young child of about six years old with child-like proportions (a larger "
            "head relative to the body, rounder cheeks, a smaller nose and chin) while keeping their eye shape, "
            "nose contour and other distinctive facial features."),
}
_CHILD = re.compile(r"\b(child|children|kids?|toddlers?|boys?|girls?|child-like|childlike)\b", re.I)
_PROPORTION = re.compile(r"(proportion|larger head|big(ger)? head|round(er)? (face|cheeks)|chubby|"
                         r"small(er)? (body|nose|chin|hands)|short(er)? (limbs|legs|arms))", re.I)
_THINK = re.compile(r"<think>.*?</think>", re.S)


@dataclass
class EnrichConfig:
    """Decoding and validation settings of the enricher.

    max_new_tokens: token limit of the generated prompt. temperature/top_p: the seeded retry's sampling.
    retry: sample once more when the greedy prompt fails validation. max_image_pixels: each reference is
    downscaled to at most this many pixels before the VLM sees it (448*448 = 256 Qwen2.5-VL tokens).
    min_words: shorter prompts are rejected as barren.
    """

    max_new_tokens: int = 300
    temperature: float = 0.7
    top_p: float = 0.9
    retry: bool = True
    max_image_pixels: int = 448 * 448
    min_words: int = 12

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError(f"Sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                              f"{self.top_p}.")
        if self.max_image_pixels < 28 * 28:
            raise ConfigError(f"max_image_pixels must be at least 784 (one 28x28 patch), got {self.max_image_pixels}.")


@dataclass
class Attempt:
    """One generation: the cleaned text, how it was decoded ('greedy' / 'sampled, seed N') and what failed."""

    text: str
    decoding: str
    issues: list[str] = field(default_factory=list)


@dataclass
class EnrichResult:
    """prompt: the prompt to use; source: 'vlm' (greedy passed), 'vlm_retry' (sampled retry passed) or
    'static' (template fallback); attempts: every generation with its validation issues."""

    prompt: str
    source: str
    attempts: list[Attempt] = field(default_factory=list)


def _check_task(task: str, k: int) -> None:
    if task not in TASKS:
        raise InputError(f"Unknown task '{task}'. Use one of {', '.join(TASKS)} "
                         f"('group' = direct group fusion, 'age' = the same people as children).")
    if k < 1:
        raise InputError(f"At least one reference image is needed, got {k}. Connect the reference portraits.")


def system_prompt(task: str, k: int, max_words: int = 120) -> str:
    """The structured system prompt with spatial instructions for ``k`` subjects (Fig. 3)."""
    _check_task(task, k)
    layout = "; ".join(f"Picture {i + 1} is the person {pos}" for i, pos in enumerate(subject_positions(k)))
    return (
        f"You write prompts for an image-editing model that composes one photo from {k} reference "
        f"picture{'s' if k > 1 else ''}, numbered in the order given. Layout: {layout}.\n"
        f"Rules:\n1. Name every subject as 'the person from Picture N' with their position, left to right; "
        f"mention each of the {k} pictures.\n"
        f"2. Bind appearance to each subject separately: hair, clothing and its colours, accessories, expression. "
        f"Never let one subject's attributes spill onto another.\n"
        f"3. State one consistent light source and colour temperature for all faces.\n"
        f"4. Describe a natural interaction and pose, and the scene.\n"
        f"5. {_TASK_RULES[task]}\n"
        f"6. Reply with the prompt only: one English paragraph under {max_words} words, no preamble, no list.")


def build_messages(instruction: str, task: str, k: int) -> list[dict]:
    """Chat messages with string contents: system (structured rules) + user (the instruction).

    The same messages are used at inference (images inserted before the user text) and in prompt DPO (trl
    inserts them the same way), so an aligned LoRA sees the format it was trained on.
    """
    instruction = (instruction or "").strip() or "Compose a natural group photo of these people."
    return [{"role": "system", "content": system_prompt(task, k)},
            {"role": "user", "content": f"Task instruction: {instruction}"}]


def check_prompt(text: str, task: str, k: int, min_words: int = 12) -> list[str]:
    """What is wrong with a generated prompt (an empty list means it passes).

    Checks: long enough; every Picture 1..k is mentioned (as 'Picture N', 'Person N' or 'Subject N'); no
    picture beyond k; for ``task='age'``, children with child-like proportions.
    """
    _check_task(task, k)
    issues = []
    if len(text.split()) < min_words:
        issues.append(f"too short ({len(text.split())} words, need {min_words})")
    mentioned = {int(n) for n in re.findall(r"\b(?:picture|person|subject|image)\s*#?\s*(\d+)\b", text, re.I)}
    missing = [i for i in range(1, k + 1) if i not in mentioned]
    if missing:
        issues.append(f"does not mention subject(s) {', '.join(f'Picture {i}' for i in missing)}")
    extra = sorted(i for i in mentioned if i > k)
    if extra:
        issues.append(f"mentions Picture {extra[0]} but only {k} picture(s) were given")
    if task == "age" and not (_CHILD.search(text) and _PROPORTION.search(text)):
        issues.append("does not describe the subjects as children with child-like proportions")
    return issues


def _clean(text: str) -> str:
    text = _THINK.sub("", text).strip()
    text = re.sub(r"^(prompt|edited prompt|output)\s*:\s*", "", text, flags=re.I)
    return " ".join(text.strip().strip('"').strip("'").split())


def to_pil_images(images: Sequence, max_pixels: int) -> list[Image.Image]:
    """Numpy/PIL/torch ``[H, W, C]`` images -> RGB PIL images of at most ``max_pixels`` pixels."""
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            image = image.detach().float().cpu().numpy()
        pil = Image.fromarray(to_rgb_uint8(image))
        scale = (max_pixels / (pil.width * pil.height)) ** 0.5
        if scale < 1:
            pil = pil.resize((max(28, round(pil.width * scale)), max(28, round(pil.height * scale))),
                             Image.Resampling.BICUBIC)
        out.append(pil)
    return out


def _structured(messages: list[dict], n_images: int) -> list[dict]:
    """String contents -> content blocks, with one image block per reference before the user text."""
    out = []
    for m in messages:
        blocks = [{"type": "text", "text": m["content"]}]
        if m["role"] == "user":
            blocks = [{"type": "image"} for _ in range(n_images)] + blocks
        out.append({"role": m["role"], "content": blocks})
    return out


def _generate(vlm: VLMBundle, images: list[Image.Image], messages: list[dict], config: EnrichConfig,
              seed: int | None) -> str:
    """One decode: greedy when ``seed`` is None, else seeded top-p sampling (global RNG state untouched)."""
    proc = vlm.processor
    text = proc.apply_chat_template(_structured(messages, len(images)), tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=images, return_tensors="pt").to(vlm.device)
    kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=seed is not None)
    if seed is not None:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
    devices = [vlm.device] if vlm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        out = vlm.model.generate(**inputs, **kwargs)
    return proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def fallback_prompt(task: str, k: int, instruction: str = "") -> str:
    """The static template, with the user's instruction appended so it is not lost."""
    base = static_prompt(task, k)
    instruction = (instruction or "").strip()
    return f"{base} Instruction: {instruction}" if instruction else base


def enrich_prompt(vlm: VLMBundle, images: Sequence, instruction: str, task: str = "group", k: int | None = None,
                  seed: int = 0, config: EnrichConfig | None = None) -> EnrichResult:
    """Write the generation prompt for ``images`` (k references, left to right) and ``instruction``.

    images: a sequence of ``[H, W, 3]`` uint8/float arrays, ``[H, W, 3]`` tensors or PIL images.
    k: the number of subjects; must equal ``len(images)`` (None = that). seed: the retry's sampling seed.
    """
    config = config or EnrichConfig()
    k = len(images) if k is None else int(k)
    if len(images) != k:
        raise InputError(f"{len(images)} reference image(s) were given for k={k} subjects. Connect one portrait "
                         f"per subject, or set k to 0 (auto).")
    _check_task(task, k)
    pil = to_pil_images(images, config.max_image_pixels)
    messages = build_messages(instruction, task, k)
    attempts: list[Attempt] = []
    for attempt_seed in [None, seed] if config.retry else [None]:
        decoding = "greedy" if attempt_seed is None else f"sampled, seed {attempt_seed}"
        try:
            text = _clean(_generate(vlm, pil, messages, config, attempt_seed))
        except RuntimeError as exc:  # out of memory, device errors: the node must still produce a prompt
            log.warning("Prompt enricher: %s decoding failed (%s)", decoding, exc)
            attempts.append(Attempt("", decoding, [f"generation failed: {exc}"]))
            continue
        attempts.append(Attempt(text, decoding, check_prompt(text, task, k, config.min_words)))
        if not attempts[-1].issues:
            return EnrichResult(text, "vlm" if attempt_seed is None else "vlm_retry", attempts)
    log.warning("Prompt enricher: the VLM's prompt failed validation (%s); using the static template.",
                "; ".join(attempts[-1].issues))
    return EnrichResult(fallback_prompt(task, k, instruction), "static", attempts)


def images_from_tensors(images) -> list[np.ndarray]:
    """ComfyUI-style IMAGE batches -> a flat list of ``[H, W, C]`` float arrays.

    images: one tensor ``[B, H, W, C]`` (C = 3 or 4, float 0..1) or a sequence of such tensors or None
    (unconnected optional inputs are skipped).
    """
    batches = [images] if isinstance(images, torch.Tensor) else [t for t in images if t is not None]
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[-1] not in (3, 4):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InputError(f"Reference input {i + 1} must be an IMAGE tensor [B, H, W, 3], got {shape}.")
        out.extend(batch.detach().float().clamp(0, 1).cpu().numpy())
    return out


def enrich_prompt_from_tensors(vlm: VLMBundle, images, instruction: str, task: str = "group", k: int = 0,
                               seed: int = 0, config: EnrichConfig | None = None) -> EnrichResult:
    """The IdGlowPromptEnricher node's core: IMAGE tensors ``[B, H, W, C]`` (or a list of them) -> EnrichResult.

    k = 0 means "one subject per image". The same seed always gives the same prompt.
    """
    arrays = images_from_tensors(images)
    if not arrays:
        raise InputError("No reference image is connected. Connect at least one IMAGE to the enricher.")
    return enrich_prompt(vlm, arrays, instruction, task, k=None if k == 0 else k, seed=seed, config=config)
