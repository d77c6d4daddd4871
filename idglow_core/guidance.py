"""Training-free identity guidance inside the Omega(t) window (FreeDoM / FlowChef style, no DiT backward).

At a step with flow time ``t`` and ``s = strength * Omega(t) > 0`` the one-step estimate ``x0 = x_t - t v`` is
moved along the negative gradient of the Hungarian ID loss (Eq. 3) of its decoded faces::

    g   = d L_ID(decode(x0), refs) / d x0                   faces detected without gradient, Eq. 2 matching
    x0' = x0 - s * g / ||g||                                norm-clipped per image (||.|| over the whole latent)

The gradient is clipped to unit L2 norm per image (every gradient norm gives the same step length), so
``strength * Omega(t)`` is the step's L2 length in (normalised) latent units: the raw ID-loss gradient's norm
varies by orders of magnitude between recognisers and resolutions (about 1e-3 for the tiny test models), which
would make a plain learning rate impossible to set once for all. Only the latent cells of the faces' windows
receive gradient, so the step concentrates there.

The gradient runs through the VAE decoder (face windows only, the SFT ``crop`` decode:
:meth:`~idglow_core.training.identity.IdentityLoss.on_latents`) and the differentiable ArcFace, never through
the DiT: ``x0`` arrives detached. A sampler step then continues from the edited estimate, e.g. Euler
``x_{t'} = x0' + t' (x_t - x0') / t``, i.e. ``v' = v - (x0' - x0) / t``.

At ``s = 0`` (strength 0, or outside the window) the estimate is returned as the same tensor: the sampling is
bit-identical to unguided sampling. ``records`` keeps one :class:`GuidanceStep` per guided evaluation (loss,
faces, gradient norm, seconds), also logged on the ``idglow`` logger.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ConfigError, NoFaceError
from .schedules import TASK_SCHEDULES, Schedule
from .training.identity import Detector, IdentityLoss

__all__ = ["GuidanceConfig", "GuidanceStep", "IdentityGuidance", "guidance_references", "arcface_path", "arcface_for"]

log = logging.getLogger("idglow")
Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GuidanceConfig:
    """strength: L2 length of the step at Omega(t) = 1, in latent units (0 = off); schedule: Omega(t), None = the
    task's; margin: latent cells around each face window; missing_value: Eq. 3's value for a reference without a
    face."""

    strength: float = 1.0
    schedule: Schedule | str | None = None
    margin: int = 4
    missing_value: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ConfigError(f"Guidance strength must be a finite number >= 0, got {self.strength}.")
        if self.margin < 0:
            raise ConfigError(f"Guidance margin must be >= 0 latent cells, got {self.margin}.")

    def resolved_schedule(self, task: str = "group") -> Schedule:
        if self.schedule is None:
            return TASK_SCHEDULES[task]
        return self.schedule if isinstance(self.schedule, Schedule) else Schedule.parse(self.schedule)


@dataclass
class GuidanceStep:
    """One guided evaluation: t, Omega(t), loss per image (before the edit), faces per image, gradient norm per
    image, wall seconds."""

    t: float
    omega: float
    loss: list[float]
    faces: list[int]
    grad_norm: list[float]
    seconds: float

    def to_dict(self) -> dict:
        return {"t": round(self.t, 5), "omega": round(self.omega, 5), "loss": [round(v, 6) for v in self.loss],
                "faces": self.faces, "grad_norm": [round(v, 6) for v in self.grad_norm],
                "seconds": round(self.seconds, 4)}


def guidance_references(images: Sequence[np.ndarray], detect: Detector, arcface) -> torch.Tensor:
    """``[k, D]`` reference embeddings by the guidance's own ArcFace (Eq. 3 needs both sides from one F):
    the face with the widest keypoint spread of each ``[H, W, 3]`` uint8 image."""
    loss = IdentityLoss(detect, arcface)
    rows = []
    for i, image in enumerate(images):
        found = detect(np.ascontiguousarray(image))
        if not found:
            raise NoFaceError(f"No face found in reference image {i + 1} of {len(images)} for identity guidance. "
                              f"Use a sharp, frontal portrait.")
        kps = max(found, key=lambda k: float(np.ptp(np.asarray(k)[:, 0])))
        rows.append(loss.reference_embeddings(image, [kps])[0])
    return torch.stack(rows)


class IdentityGuidance:
    """``x0 [b, C, 1, h, w]`` (normalised latents) at time ``t`` -> the guided estimate (see module docstring).

    refs: ``[k, D]`` reference embeddings from ``arcface``; decode: latents (any window) -> ``[b, 3, H, W]``
    in [0, 1], differentiable; detect: ``[H, W, 3]`` uint8 -> list of ``[5, 2]`` keypoints; arcface: a
    :class:`~idglow_core.faces.ArcFace`-like module; detect_decode: optional no-grad decode for detection.
    """

    def __init__(self, refs: torch.Tensor, decode: Decode, detect: Detector, arcface, config: GuidanceConfig,
                 schedule: Schedule, detect_decode: Decode | None = None):
        self.refs, self.decode, self.config, self.schedule = refs.detach(), decode, config, schedule
        self.detect_decode = detect_decode
        self.loss_fn = IdentityLoss(detect, arcface, config.missing_value)
        self.records: list[GuidanceStep] = []

    def scale(self, t: float) -> tuple[float, float]:
        """``(Omega(t), strength * Omega(t))``."""
        w = float(self.schedule(min(max(float(t), 0.0), 1.0)))
        return w, self.config.strength * w

    def loss(self, x0: torch.Tensor):
        """``(loss [b], result, z)``: Eq. 3 per image on a differentiable float copy ``z`` of ``x0``."""
        z = x0.detach().float().clone().requires_grad_(True)
        refs = [self.refs.to(z.device)] * z.shape[0]
        res = self.loss_fn.on_latents(z, self.decode, refs, margin=self.config.margin,
                                      detect_decode=self.detect_decode)
        return res.loss, res, z

    def __call__(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        omega, s = self.scale(t)
        if s == 0.0:
            return x0  # outside the window or strength 0: untouched, bit for bit
        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            loss, res, z = self.loss(x0)
            grad = torch.autograd.grad(loss.sum(), z, allow_unused=True)[0]
        grad = torch.zeros_like(z) if grad is None else grad.detach()
        norm = grad.flatten(1).norm(dim=1)                                   # [b]
        unit = grad / norm.clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))   # zero gradient -> no step
        delta = -s * unit
        step = GuidanceStep(float(t), omega, [float(v) for v in loss.detach()], res.faces,
                            [float(v) for v in norm], time.perf_counter() - start)
        self.records.append(step)
        log.info("identity guidance t=%.4f omega=%.3f loss=%s faces=%s |g|=%s %.3fs", step.t, omega,
                 [round(v, 4) for v in step.loss], step.faces, [round(v, 4) for v in step.grad_norm], step.seconds)
        return x0 + delta.to(device=x0.device, dtype=x0.dtype)


def arcface_path(analyzer):
    """``w600k_r50.onnx`` of ``analyzer``'s buffalo_l folder. Raises :class:`ModelNotFoundError` for backends
    without it (dlib: its recogniser cannot be differentiated)."""
    from pathlib import Path

    from .errors import ModelNotFoundError

    folder = getattr(analyzer, "folder", None)
    if folder is None or not (Path(folder) / "w600k_r50.onnx").is_file():
        raise ModelNotFoundError(
            f"Identity guidance needs the insightface ArcFace (buffalo_l w600k_r50.onnx) for its differentiable "
            f"path, but the face analyzer is '{getattr(analyzer, 'name', type(analyzer).__name__)}'. dlib's "
            f"recogniser cannot be differentiated. Load the insightface backend (buffalo_l in models/insightface "
            f"or $IDGLOW_INSIGHTFACE_DIR); best-of-N and seed search work with dlib.")
    return Path(folder) / "w600k_r50.onnx"


def arcface_for(analyzer):
    """The differentiable ArcFace for ``analyzer``'s embeddings (:func:`arcface_path` read into torch)."""
    from .faces.arcface import ArcFace

    return ArcFace.from_onnx(arcface_path(analyzer))
