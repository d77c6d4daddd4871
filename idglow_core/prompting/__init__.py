"""Prompts for multi-subject scenes: the paper's static templates and the VLM prompt enricher (M_P, §3.2).

The enricher, loader and alignment modules import torch/transformers, so they load on first use:
``from idglow_core.prompting import enrich_prompt`` works, while ``import idglow_core.prompting`` stays cheap.
"""
from __future__ import annotations

import importlib

from .templates import TASKS, static_prompt

_LAZY = {
    "EnrichConfig": "enricher", "EnrichResult": "enricher", "Attempt": "enricher", "build_messages": "enricher",
    "check_prompt": "enricher", "enrich_prompt": "enricher", "enrich_prompt_from_tensors": "enricher",
    "fallback_prompt": "enricher", "VLMBundle": "vlm", "load_vlm": "vlm", "apply_lora": "vlm",
}

__all__ = ["TASKS", "static_prompt", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
