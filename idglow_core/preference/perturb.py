"""Controlled, reproducible degradations of good images (paper §3.4: "noise injection and saturation
adjustment"), used as rejected samples opposite the image they were made from.

Each :class:`Perturbation` is ``(kind, strength, seed)``; applying it twice to the same image gives the same
bytes, and the three values are recorded with every perturbed candidate. Kinds and what ``strength`` means:

- ``noise``: additive Gaussian noise, standard deviation ``strength`` in [0, 1] pixel units (0.06 ~ 15 levels);
- ``saturation``: ``out = gray + strength * (x - gray)`` with ITU-R 601 luma ``gray`` (PIL's ``Color``
  enhancer); ``strength`` < 1 washes colours out, > 1 oversaturates, 1 is the identity;
- ``jpeg``: re-encode at JPEG quality ``strength`` (1..95);
- ``blur``: Gaussian blur with radius ``strength`` pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ConfigError
from ..images import to_rgb_uint8

__all__ = ["Perturbation", "PERTURBATION_KINDS", "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" conversion
_RANGES = {"noise": (0.0, 1.0), "saturation": (0.0, 4.0), "jpeg": (1.0, 95.0), "blur": (0.0, 50.0)}
PERTURBATION_KINDS = tuple(_RANGES)


@dataclass(frozen=True)
class Perturbation:
    """One degradation. ``apply(image [H, W, 3] uint8) -> [H, W, 3] uint8``; deterministic given ``seed``."""

    kind: str
    strength: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _RANGES:
            raise ConfigError(f"Unknown perturbation kind '{self.kind}'. Choose from {list(PERTURBATION_KINDS)}.")
        lo, hi = _RANGES[self.kind]
        if not lo <= float(self.strength) <= hi:
            raise ConfigError(f"Perturbation '{self.kind}' strength {self.strength} is outside [{lo}, {hi}]. "
                              f"See idglow_core.preference.perturb for what strength means per kind.")

    @property
    def name(self) -> str:
        """File-name-safe label, e.g. ``noise0.06-s3``."""
        return f"{self.kind}{self.strength:g}-s{self.seed}"

    def with_seed(self, seed: int) -> "Perturbation":
        return Perturbation(self.kind, self.strength, seed)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "strength": float(self.strength), "seed": int(self.seed)}

    def apply(self, image) -> np.ndarray:
        """Degrade one image (anything :func:`idglow_core.images.to_rgb_uint8` accepts)."""
        x = to_rgb_uint8(image)
        return {"noise": _noise, "saturation": _saturation, "jpeg": _jpeg, "blur": _blur}[self.kind](
            x, float(self.strength), int(self.seed))


def _noise(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = x.astype(np.float64) / 255.0 + rng.normal(0.0, sigma, size=x.shape)
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def _saturation(x: np.ndarray, factor: float, seed: int) -> np.ndarray:
    xf = x.astype(np.float64)
    gray = xf @ np.asarray(LUMA_WEIGHTS)  # [H, W]
    y = gray[..., None] + factor * (xf - gray[..., None])
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _jpeg(x: np.ndarray, quality: float, seed: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _blur(x: np.ndarray, radius: float, seed: int) -> np.ndarray:
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8).copy()
