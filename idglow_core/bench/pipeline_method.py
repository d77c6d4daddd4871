"""IdGlowPipeline (or the base Qwen-Image-Edit pipeline when no adapter is given) as a benchmark method.

Extra generation options come as ``key=value`` strings (``--pipeline-arg steps=20``), parsed as YAML scalars
and passed to :class:`idglow_core.pipeline.GenerateConfig` by name, so options that the config gains later
(e.g. training-free guidance) work here without a change. Without an adapter only the base pipeline's
options apply (steps, true_cfg_scale, negative_prompt, height, width).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from ..errors import InputError
from ..images import load_image, save_image_atomic
from .run import BenchRow

__all__ = ["parse_pipeline_args", "PipelineMethod", "BASE_OPTIONS"]

log = logging.getLogger("idglow")
ROW_FIELDS = ("task", "prompt", "seed")  # set from each bench row, never from --pipeline-arg
BASE_OPTIONS = ("steps", "true_cfg_scale", "negative_prompt", "height", "width")


def parse_pipeline_args(items: Sequence[str] | None, adapter: bool) -> dict[str, Any]:
    """``["steps=20", "schedule=gate(lo=0.3,hi=0.6)"]`` -> ``{"steps": 20, "schedule": "gate(lo=0.3,hi=0.6)"}``.

    Keys must be fields of GenerateConfig (with an adapter) or :data:`BASE_OPTIONS` (without); the row's own
    task, prompt and seed cannot be overridden."""
    from ..pipeline import GenerateConfig

    valid = ({f.name for f in dataclasses.fields(GenerateConfig)} if adapter else set(BASE_OPTIONS)) - set(ROW_FIELDS)
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise InputError(f"--pipeline-arg {item!r}: expected KEY=VALUE with KEY one of {sorted(valid)}"
                             f"{'' if adapter else ' (without --adapter only the base pipeline options apply)'}.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out[key] = raw if isinstance(value, (dict, list)) and key == "schedule" else value
    return out


class PipelineMethod:
    """``generate(row, out_path)`` with an :class:`IdGlowPipeline` (``pipe``) or, when ``base`` is given
    instead, the plain edit pipeline."""

    def __init__(self, pipe=None, base=None, options: dict | None = None):
        if (pipe is None) == (base is None):
            raise InputError("PipelineMethod needs exactly one of an IdGlowPipeline (pipe=) or a base edit "
                             "pipeline (base=).")
        self.pipe, self.base, self.options = pipe, base, dict(options or {})

    @classmethod
    def load(cls, model: str, adapter: str | None, options: dict, device: str | None = None,
             dtype: torch.dtype | None = None, face_backend: str = "auto", face_model_dir: str | None = None):
        from ..pipeline import IdGlowPipeline, load_edit_pipeline

        if adapter:
            return cls(pipe=IdGlowPipeline.from_pretrained(model, adapter, device=device, dtype=dtype,
                                                           face_backend=face_backend, face_model_dir=face_model_dir),
                       options=options)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        return cls(base=load_edit_pipeline(model, dtype).to(device), options=options)

    def generate(self, row: BenchRow, out_path: Path) -> None:
        refs = [load_image(r) for r in row.refs]
        if self.pipe is not None:
            from ..pipeline import GenerateConfig

            cfg = GenerateConfig(**{"output_type": "pil", **self.options, "task": row.task, "prompt": row.prompt,
                                    "seed": row.seed})
            image = self.pipe(refs, cfg).images[0]
        else:
            from PIL import Image

            opts = {"steps": 40, "true_cfg_scale": 4.0, "negative_prompt": " ", **self.options}
            out = self.base(image=[Image.fromarray(r) for r in refs], prompt=row.prompt,
                            negative_prompt=opts["negative_prompt"], true_cfg_scale=opts["true_cfg_scale"],
                            num_inference_steps=opts["steps"], height=opts.get("height"), width=opts.get("width"),
                            generator=torch.Generator(device="cpu").manual_seed(row.seed))
            image = out.images[0]
        if isinstance(image, torch.Tensor):  # output_type="pt": [3, H, W] in [0, 1]
            image = image.permute(1, 2, 0).float().cpu().numpy()
        save_image_atomic(np.asarray(image), out_path)
