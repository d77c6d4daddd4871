"""Conversions between ComfyUI's types and the ones ``idglow_core`` uses. No ComfyUI import here.

ComfyUI IMAGE: ``[B, H, W, C]`` float in [0, 1] (C = 3, sometimes 4). The core takes ``[H, W, 3]`` uint8 RGB.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from idglow_core.errors import InputError
from idglow_core.images import to_rgb_uint8

__all__ = ["image_batch_to_numpy", "numpy_to_image_batch", "collect_references", "check_choice", "parse_weights"]


def image_batch_to_numpy(images: torch.Tensor, label: str = "image") -> list[np.ndarray]:
    """images: ``[B, H, W, C]`` float in [0, 1] (a single ``[H, W, C]`` is accepted) -> B arrays ``[H, W, 3]`` uint8."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"'{label}' must be a ComfyUI IMAGE tensor, got {type(images).__name__}. Connect an "
                         f"IMAGE output (Load Image, VAE Decode) to it.")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(f"'{label}' has shape {tuple(images.shape)}; a ComfyUI IMAGE is [B, H, W, C] with C = 3. "
                         f"Connect an IMAGE, not a MASK or LATENT.")
    arr = images.detach().float().cpu().clamp(0.0, 1.0).numpy()
    return [to_rgb_uint8(a) for a in arr]


def numpy_to_image_batch(images: Sequence[np.ndarray], pad_value: float = 0.0) -> torch.Tensor:
    """k arrays ``[H_i, W_i, 3]`` uint8 -> IMAGE ``[k, H, W, 3]`` float in [0, 1]; smaller images are centred on a
    ``pad_value`` canvas of the largest height and width (no resizing, so nothing is distorted)."""
    if not images:
        raise InputError("No images to convert. At least one image is needed.")
    h = max(int(a.shape[0]) for a in images)
    w = max(int(a.shape[1]) for a in images)
    out = torch.full((len(images), h, w, 3), float(pad_value))
    for i, a in enumerate(images):
        rgb = torch.tensor(to_rgb_uint8(a), dtype=torch.float32) / 255.0
        top, left = (h - rgb.shape[0]) // 2, (w - rgb.shape[1]) // 2
        out[i, top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    return out


def collect_references(batch: torch.Tensor | None, extras: Iterable[torch.Tensor | None]) -> list[np.ndarray]:
    """The reference portraits in order: every image of ``batch``, then each connected optional input.

    Optional inputs exist because a ComfyUI batch needs one size; images of different sizes come in separately.
    """
    refs: list[np.ndarray] = []
    if batch is not None:
        refs += image_batch_to_numpy(batch, "images")
    for i, extra in enumerate(extras):
        if extra is not None:
            refs += image_batch_to_numpy(extra, f"image{i + 1}")
    if not refs:
        raise InputError("No reference images are connected. Connect a batch to 'images' or single portraits to "
                         "'image1'..'image4' (one person per image, in the order the prompt names them).")
    return refs


def check_choice(name: str, value, options: Sequence) -> None:
    """Dropdown check: ComfyUI does not validate V3 combo values, so a node does it itself."""
    if value not in options:
        raise InputError(f"'{name}' = {value!r} is not one of {list(options)}. Pick a value from the dropdown "
                         f"(a saved workflow may come from another version of IdGlow).")


def parse_weights(text: str, count: int, default: float = 1.0) -> list[float]:
    """Per-identity weights from a comma-separated string: '1, 0.8' -> [1.0, 0.8] (+ ``default`` for the rest).

    Raises :class:`InputError` for non-numbers, negative values or more weights than identities.
    """
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"Per-identity weights '{text}' must be numbers separated by commas, e.g. '1.0, 0.8, 1.2' "
                         f"(one per reference, left to right in reference order).") from None
    if len(values) > count:
        raise InputError(f"{len(values)} per-identity weights were given for {count} identities. Give at most one "
                         f"weight per reference image.")
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise InputError(f"Per-identity weights must be finite and >= 0, got {values}. Use 0 to switch a person off.")
    return values + [float(default)] * (count - len(values))

