"""Seed search with early pruning: N candidates to the pruning time t_p, score their one-step estimates, finish M.

Step accounting (one "sample-step" = one candidate through one denoising step; CFG doubles both sides)::

    k      = split_step(sigmas, t_p)   steps every candidate runs: up to and including the first step whose
                                       time sigma_i <= t_p (the estimate x0 = x - sigma_i v of that step is scored)
    pruned = N * k + M * (steps - k)   full best-of-N = N * steps

With ``steps = 8``, N = 8, M = 2 and k = 4: 40 / 64 = 0.625 of full best-of-8. t_p is a flow time, not a
fraction of the steps: with the shift Qwen-Image uses (about 3) the early steps crowd near t = 1, so t_p = 0.5
falls past the middle step; :func:`split_step` says which step it is.

:class:`DiffusersStepHook` is the diffusers side (``QwenImageEditPlusPipeline``): it wraps the scheduler's step
to read ``x0 = x - sigma v`` at every step, applies an :class:`~idglow_core.guidance.IdentityGuidance` there if
given (``v' = v - (x0' - x0) / sigma``), keeps the estimate of step k-1 and stops the loop after step k.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from .errors import ConfigError

__all__ = ["split_step", "step_accounting", "check_search", "DiffusersStepHook"]

log = logging.getLogger("idglow")


def check_search(candidates: int, keep: int, prune_at: float | None) -> None:
    """Typed errors for impossible seed-search settings."""
    if candidates < 1 or keep < 1 or keep > candidates:
        raise ConfigError(f"Seed search needs 1 <= keep <= candidates, got candidates={candidates}, keep={keep}.")
    if prune_at is not None and not (0.0 < float(prune_at) < 1.0):
        raise ConfigError(f"prune_at={prune_at} is a flow time and must lie in (0, 1): 1 is pure noise, 0 the "
                          f"clean image. E.g. 0.5.")


def split_step(sigmas: Sequence[float] | torch.Tensor, prune_at: float) -> int:
    """k: the number of steps all candidates run, from the schedule ``sigmas`` (``steps + 1`` values ending in
    0, or ``steps`` values). k = 1 + the index of the first step with sigma <= prune_at (``steps`` if none)."""
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    steps = len(values) - 1 if values and values[-1] == 0.0 else len(values)
    check_search(1, 1, prune_at)
    for i in range(steps):
        if values[i] <= prune_at + 1e-6:  # float32 sigmas against a float64 t_p
            return i + 1
    return steps


def step_accounting(candidates: int, keep: int, steps: int, k: int) -> dict:
    """Sample-steps of the pruned search and of full best-of-N, and their ratio."""
    pruned = candidates * k + keep * (steps - k)
    full = candidates * steps
    return {"candidates": candidates, "keep": keep, "steps": steps, "split_step": k, "pruned_steps": pruned,
            "full_steps": full, "ratio": pruned / full}


class DiffusersStepHook:
    """Wraps ``pipe.scheduler.step`` for one pipeline call (a context manager); pass :meth:`callback` as the
    pipeline's ``callback_on_step_end``.

    height / width: the output size in pixels (to unpack latents). guidance: an IdentityGuidance or None.
    prune_at: t_p; at the first step the hook sets ``split`` = k (:func:`split_step` on the scheduler's sigmas),
    keeps the (guided) estimate of step k-1 in ``x0`` (packed ``[B, L, C*4]``) and stops the loop after step k
    (the pipeline skips the rest: no DiT calls).
    ``log`` gets one dict per step: step, t, rows (batch), seconds since the previous step.
    """

    def __init__(self, pipe, height: int, width: int, guidance=None, prune_at: float | None = None):
        self.pipe, self.height, self.width, self.guidance, self.prune_at = pipe, int(height), int(width), guidance, prune_at
        self.capture_step: int | None = None
        self.stop_after: int | None = None
        self.split: int | None = None
        self.x0: torch.Tensor | None = None
        self.log: list[dict] = []
        self._last = 0.0

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[B, L, C*4]`` -> ``[B, C, 1, h, w]`` (normalised latents)."""
        return self.pipe._unpack_latents(packed, self.height, self.width, self.pipe.vae_scale_factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, _, h, w = latents.shape
        return self.pipe._pack_latents(latents[:, :, 0], b, c, h, w)

    def __enter__(self) -> "DiffusersStepHook":
        sched = self.pipe.scheduler
        self._original = sched.step
        sched.step = self._step  # instance attribute: shadows the class method for this call only
        self._last = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.scheduler.step

    def _step(self, model_output, timestep, sample, *args, **kwargs):
        sched = self.pipe.scheduler
        i = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
        sigma = float(sched.sigmas[i])
        if self.prune_at is not None and self.split is None:
            self.split = split_step(sched.sigmas, self.prune_at)
            self.capture_step, self.stop_after = self.split - 1, self.split
        guided_loss = None
        if self.guidance is not None and sigma > 0:
            x0 = self.unpack(sample.float() - sigma * model_output.float())      # one-step estimate
            before = len(self.guidance.records)
            guided = self.guidance(x0, sigma)
            if guided is not x0:                                                 # Omega(t) * strength > 0
                model_output = (model_output.float() - self.pack(guided - x0) / sigma).to(model_output.dtype)
            if len(self.guidance.records) > before:
                guided_loss = self.guidance.records[-1].loss
        if i == self.capture_step:
            self.x0 = (sample.float() - sigma * model_output.float()).detach().clone()
        out = self._original(model_output, timestep, sample, *args, **kwargs)
        now = time.perf_counter()
        entry = {"step": i, "t": round(sigma, 5), "rows": int(sample.shape[0]), "seconds": round(now - self._last, 4)}
        if guided_loss is not None:
            entry["id_loss"] = guided_loss
        self.log.append(entry)
        log.info("step %d t=%.4f rows=%d %.3fs%s", i, sigma, entry["rows"], entry["seconds"],
                 f" id_loss={entry['id_loss']}" if "id_loss" in entry else "")
        self._last = now
        return out

    def callback(self, pipe, i: int, t, kwargs: dict) -> dict:
        if self.stop_after is not None and i + 1 >= self.stop_after:
            pipe._interrupt = True  # the pipeline's loop skips the remaining steps
        return {}

