"""Prompts for multi-subject scenes: the paper's static templates and the VLM prompt enricher (M_P, §3.2)."""
from .templates import TASKS, static_prompt

__all__ = ["TASKS", "static_prompt"]
