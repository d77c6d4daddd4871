"""Candidate sources: the current model as a generator for pair building.

A generator is any callable ``generate(refs, prompt, seed) -> image`` (refs: k ``[H, W, 3]`` uint8 RGB); if it
also takes a ``task`` keyword, :func:`idglow_core.preference.build_pairs` passes the group's task. Tests use a
stand-in; real runs wrap :class:`idglow_core.pipeline.IdGlowPipeline`::

    pipe = IdGlowPipeline.from_pretrained("Qwen/Qwen-Image-Edit-2511", "idglow.safetensors", device="cuda")
    generate = pipeline_generator(pipe, GenerateConfig(steps=40))
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from ..images import to_rgb_uint8

__all__ = ["pipeline_generator", "call_generator"]


def pipeline_generator(pipeline, config=None) -> Callable[..., np.ndarray]:
    """Wrap an ``IdGlowPipeline``: ``generate(refs, prompt, seed, task=None) -> [H, W, 3]`` uint8.

    config: a :class:`idglow_core.pipeline.GenerateConfig` with the fixed options (steps, size, weight,
    schedule); its prompt, seed and (when given) task are replaced per call."""
    from ..pipeline import GenerateConfig

    base = config or GenerateConfig()

    def generate(refs: Sequence[np.ndarray], prompt: str, seed: int, task: str | None = None) -> np.ndarray:
        cfg = dataclasses.replace(base, prompt=prompt, seed=int(seed), task=task or base.task, output_type="pil")
        return to_rgb_uint8(pipeline(list(refs), cfg).images[0])

    return generate


def call_generator(generate: Callable[..., Any], refs: list[np.ndarray], prompt: str, seed: int, task: str) -> Any:
    """Call ``generate`` with ``task=`` only when its signature has a ``task`` parameter."""
    try:
        takes_task = "task" in inspect.signature(generate).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        takes_task = False
    return generate(refs, prompt, seed, task=task) if takes_task else generate(refs, prompt, seed)
