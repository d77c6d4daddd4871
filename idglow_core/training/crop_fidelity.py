"""How far ``loss.id_decode=crop`` is from ``full``: a face's window decode vs the same pixels of the full decode.

``crop`` decodes with gradient only the latent window around each face (``identity.latent_window``) and assumes
that equals cropping the full decode. A convolutional decoder only differs near the window's border (zero
padding where the full decode sees neighbours), which the margin pushes away from the face; but the Qwen-Image
VAE decoder also has self-attention over every spatial position in its mid-block, so every output pixel depends
on the whole latent and the window decode is never exact. :func:`crop_decode_error` measures the difference on
what the ID loss actually sees, the ArcFace-aligned face crop (``faces.arcface.crop_faces``), per margin.

``bench/crop_decode_fidelity.py`` runs it on the real VAE architecture (random weights by default, real
weights with ``--vae``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .identity import crop_pixel_box, latent_window

__all__ = ["face_keypoints", "crop_decode_error"]


def face_keypoints(center: tuple[float, float], face_px: float) -> np.ndarray:
    """``[5, 2]`` keypoints of an upright face whose ArcFace crop spans about ``face_px`` pixels, centred at
    ``center`` (x, y): the 112 px ArcFace template scaled and moved."""
    from ..faces.align import arcface_template

    t = arcface_template(112).astype(np.float32)
    return (t - 56.0) * (face_px / 112.0) + np.asarray(center, np.float32)


@torch.no_grad()
def crop_decode_error(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                      faces: Sequence[np.ndarray], margins: Sequence[int], size: int = 112) -> list[dict]:
    """Per margin and face: the window decode's ArcFace crop vs the full decode's.

    decode: latents ``[1, C, 1, h, w]`` -> ``[1, 3, f*h, f*w]`` in [0, 1] (e.g. ``sft.vae_decoder``);
    faces: ``[5, 2]`` pixel keypoints each. Returns rows with ``margin``, ``face``, ``window`` (latent cells
    ``[y0, y1, x0, x1]``), ``window_frac`` (its share of the latent area: the activation memory ``crop`` keeps
    relative to ``full``), and the crop difference in [0, 1] pixel units: ``max_abs``, ``mean_abs``,
    ``psnr_db`` (inf when identical).
    """
    from ..faces.arcface import crop_faces

    full = decode(latents)
    h, w = latents.shape[-2:]
    factor = full.shape[-1] // w
    zero = torch.zeros(1, dtype=torch.long)
    rows = []
    for margin in margins:
        for i, kps in enumerate(faces):
            win = latent_window(crop_pixel_box(kps, size), factor, (h, w), margin)
            patch = decode(latents[..., win.y0:win.y1, win.x0:win.x1])
            want = crop_faces(full, torch.as_tensor(kps[None], dtype=full.dtype), zero, size)
            got = crop_faces(patch, torch.as_tensor(win.shift(kps, factor)[None], dtype=patch.dtype), zero, size)
            diff = (got - want).abs()
            mse = float(diff.pow(2).mean())
            rows.append({"margin": margin, "face": i, "window": [win.y0, win.y1, win.x0, win.x1],
                         "window_frac": round((win.y1 - win.y0) * (win.x1 - win.x0) / (h * w), 4),
                         "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                         "psnr_db": math.inf if mse == 0 else round(10 * math.log10(1.0 / mse), 2)})
    return rows
