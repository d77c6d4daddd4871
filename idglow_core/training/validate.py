"""Validation FaceSim during training: sample a few images with the current weights, score their faces.

Every ``run.validate_every`` optimizer steps the main process takes the first ``run.validate_samples``
encoded samples, samples each from fixed noise with a short Euler flow (``run.validate_steps`` steps, the
adapter at full strength), decodes, detects and embeds faces with the run's face analyzer, and logs the
Hungarian-matched FaceSim (``val/facesim``, strict: a missing face counts 0) and ``val/faces_found``. With an
``out_dir`` the sampled images are saved there as ``step-<step>-<i>.png`` (main process only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..facesim import match_identities
from ..images import save_image_atomic

__all__ = ["FaceSimValidator"]


class FaceSimValidator:
    """``validator(module, step) -> {"val/facesim": ..., "val/faces_found": ...}`` (call on one process)."""

    def __init__(self, samples: Sequence[dict[str, Any]], collate: Callable, decode: Callable, analyzer,
                 steps: int = 8, seed: int = 0, out_dir: str | Path | None = None,
                 injection: Callable[[list[str] | None, torch.Tensor], torch.Tensor] | None = None):
        self.samples, self.collate, self.decode, self.analyzer = list(samples), collate, decode, analyzer
        self.injection = injection  # (tasks, t [B]) -> [B] strength: the trained Omega(t), as deployed
        self.steps, self.seed = steps, seed
        self.out_dir = Path(out_dir) if out_dir else None

    @torch.no_grad()
    def _sample(self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        device = next(module.parameters()).device
        z = torch.randn(batch["latents"].shape, generator=generator).to(device)
        ts = torch.linspace(1.0, 0.0, self.steps + 1)
        refs = [r.to(device) for r in batch["ref_latents"]]
        for t, t_next in zip(ts[:-1], ts[1:]):
            tb = t.repeat(z.shape[0])
            inject = None if self.injection is None else self.injection(batch.get("task"), tb)
            v = module(z, tb.to(device), refs, batch["prompt_embeds"].to(device), batch["prompt_mask"].to(device),
                       batch["id_embeds"].to(device), batch["id_mask"].to(device), inject)
            z = z + (t_next - t).item() * v  # Euler step of dz/dt = v from t = 1 (noise) to 0
        return self.decode(z)

    def __call__(self, module: torch.nn.Module, step: int) -> dict[str, float]:
        was_training = module.training
        module.eval()
        scores, found = [], []
        try:
            for i, item in enumerate(self.samples):
                image = self._sample(module, self.collate([item]), torch.Generator().manual_seed(self.seed + i))
                pixels = (image[0].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                if self.out_dir is not None and _is_main_process():
                    save_image_atomic(pixels, self.out_dir / f"step-{step:08d}-{i}.png")
                faces = self.analyzer.analyze(np.ascontiguousarray(pixels))
                gen = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, item["id_embeds"].shape[1]))
                scores.append(match_identities(item["id_embeds"].numpy(), gen).strict)
                found.append(len(faces))
        finally:
            module.train(was_training)
        return {"val/facesim": float(np.mean(scores)), "val/faces_found": float(np.mean(found))}


def _is_main_process() -> bool:
    """True outside distributed runs and on rank 0 (under FSDP every rank runs the validator)."""
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0
