"""The matched identity loss of Algorithm 1 (lines 13-14) on decoded one-step estimates.

Faces are detected *without gradient* on the decoded image (the detector sees uint8 pixels), then cropped
differentiably with the detected keypoints and embedded by the torch ArcFace, so the gradient reaches the
image, the one-step estimate and the network. References are embedded once by the same encoder (Eq. 3 needs
both sides from the same F). Images without a detectable face get ``missing_value`` per reference.

Two ways to get from latents to the loss (``loss.id_decode``):

- ``full``: ``identity(decode(z), refs)``: the whole estimate is decoded with gradient.
- ``crop``: ``identity.on_latents(z, decode, refs, margin)``: the estimate is decoded once without gradient
  (detection only), then for each face only the latent window that covers its aligned crop (plus ``margin``
  latent cells) is decoded with gradient. The VAE's activations kept for backward shrink from the whole image
  to the faces' windows; gradients reach only those latent cells.

The detector is injectable: ``detect(image [H, W, 3] uint8) -> list of [5, 2] keypoints``. The default wraps a
:class:`~idglow_core.faces.FaceAnalyzer`; tests inject a stub with fixed keypoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from ..facesim import id_loss

__all__ = ["Detector", "IdentityLoss", "IdLossResult", "LatentWindow", "analyzer_detector", "crop_pixel_box",
           "latent_window", "tiny_arcface"]

Detector = Callable[[np.ndarray], list]
Decode = Callable[[torch.Tensor], torch.Tensor]


def analyzer_detector(analyzer) -> Detector:
    """Keypoints of every face a :class:`~idglow_core.faces.FaceAnalyzer` finds (left to right)."""
    return lambda image: [np.asarray(f.kps, dtype=np.float32) for f in analyzer.analyze(image)]


def tiny_arcface(dim: int = 32, size: int = 32, seed: int = 0):
    """A random, frozen, tiny stand-in for ArcFace (tests and the tiny CPU config): ``[N, 3, size, size]``
    crops in [0, 1] -> ``[N, dim]`` unit embeddings. Same interface as ``faces.ArcFace``."""
    from ..faces.arcface import ArcFace

    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, dim))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ArcFace(net, input_size=size)


@dataclass(frozen=True)
class LatentWindow:
    """Latent cells ``[y0, y1) x [x0, x1)``; with spatial factor f they decode to pixels ``[f*y0, f*y1) x
    [f*x0, f*x1)``, so keypoints move by ``(-f*x0, -f*y0)`` into the window's pixel frame."""

    y0: int
    y1: int
    x0: int
    x1: int

    def shift(self, kps: np.ndarray, factor: int) -> np.ndarray:
        """``[5, 2]`` image-pixel keypoints -> the same points in the decoded window's pixels."""
        return (np.asarray(kps, np.float32) - np.array([factor * self.x0, factor * self.y0], np.float32))


def crop_pixel_box(kps: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` in image pixels of the points the aligned ``size`` x ``size`` crop samples.

    The crop maps output pixel ``q`` to input ``p = A^-1 (q - t)`` (``M = [A | t]``, the keypoints' similarity
    to the template, as in :func:`~idglow_core.faces.arcface.crop_faces`); with ``align_corners`` the corners
    are ``q in {0, size-1}^2``, so the box of their pre-images bounds every sample.
    """
    from ..faces.align import arcface_template, estimate_similarity

    m = estimate_similarity(kps, arcface_template(size))
    q = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    p = (q - m[:, 2]) @ np.linalg.inv(m[:, :2]).T  # [4, 2], inverse similarity of the crop's corners
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())


def latent_window(box: tuple[float, float, float, float], factor: int, latent_hw: tuple[int, int],
                  margin: int) -> LatentWindow:
    """The latent cells whose decode covers every pixel bilinear sampling reads inside ``box``, plus
    ``margin`` cells on each side, clamped to the latent ``[h, w]`` (never empty).

    A sample at ``p`` reads pixels ``floor(p)`` and ``ceil(p)``; pixel ``P`` lies in cell ``P // factor``.
    (1e-3 px of slack keeps float noise from adding a pixel at an exactly integer edge.)
    """
    h, w = latent_hw
    x0 = math.floor(box[0] + 1e-3) // factor - margin
    y0 = math.floor(box[1] + 1e-3) // factor - margin
    x1 = math.ceil(box[2] - 1e-3) // factor + 1 + margin
    y1 = math.ceil(box[3] - 1e-3) // factor + 1 + margin
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    return LatentWindow(y0=y0, y1=min(max(y1, y0 + 1), h), x0=x0, x1=min(max(x1, x0 + 1), w))


@dataclass
class IdLossResult:
    """Per image: ``loss [b]`` (Eq. 3, differentiable), ``faces [b]`` faces found, ``missing [b]`` references
    without a matched face, ``refs [b]`` references."""

    loss: torch.Tensor
    faces: list[int]
    missing: list[int]
    refs: list[int]


class IdentityLoss:
    """``L_ID`` of Eq. 3 for a batch of decoded images against their references' embeddings."""

    def __init__(self, detect: Detector, arcface: nn.Module, missing_value: float = 1.0):
        self.detect, self.arcface, self.missing_value = detect, arcface, float(missing_value)

    def _embed(self, images: torch.Tensor, kps: Sequence[np.ndarray], index: Sequence[int]) -> torch.Tensor:
        from ..faces.arcface import embed_faces_differentiable

        kps_t = torch.as_tensor(np.stack(kps), dtype=images.dtype, device=images.device)
        return embed_faces_differentiable(images, kps_t, torch.as_tensor(index, dtype=torch.long), self.arcface)

    @torch.no_grad()
    def reference_embeddings(self, image: np.ndarray, kps: Sequence[np.ndarray]) -> torch.Tensor:
        """Embed the given faces of one reference image: ``[H, W, 3]`` uint8 + k keypoint sets -> ``[k, D]``."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        return self._embed(x, list(kps), [0] * len(kps))

    @torch.no_grad()
    def _find(self, images: torch.Tensor) -> list[list[np.ndarray]]:
        """Keypoints per image, detected on the uint8 rendering of ``images`` ``[b, 3, H, W]`` in [0, 1]."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [self.detect(np.ascontiguousarray(p)) for p in pixels]

    def _score(self, emb: torch.Tensor | None, found: list[list[np.ndarray]], refs: Sequence[torch.Tensor],
               anchor: torch.Tensor) -> IdLossResult:
        """Eq. 2-3 per image from ``emb`` ``[N, D]`` (faces in image order, None if none); ``anchor`` ``[b, ...]``
        (what the gradient flows into) keeps images without a face in the graph."""
        index = [b for b, per in enumerate(found) for _ in per]
        losses, missing = [], []
        for b, ref in enumerate(refs):
            mine = [i for i, j in enumerate(index) if j == b]
            gen = emb[mine] if emb is not None else anchor.new_zeros(0, ref.shape[1])
            ref = ref.to(device=anchor.device, dtype=gen.dtype)
            value = id_loss(ref, gen, missing_value=self.missing_value)  # Eq. 2-3 (Hungarian, detached)
            if gen.shape[0] == 0:
                value = value + 0.0 * anchor[b].sum()  # keep the graph connected for DDP
            losses.append(value)
            missing.append(max(0, ref.shape[0] - gen.shape[0]))
        return IdLossResult(torch.stack(losses), [len(f) for f in found], missing, [r.shape[0] for r in refs])

    def __call__(self, images: torch.Tensor, refs: Sequence[torch.Tensor]) -> IdLossResult:
        """images: ``[b, 3, H, W]`` in [0, 1] (differentiable); refs: b tensors ``[k_i, D]``."""
        found = self._find(images)
        kps = [k for per in found for k in per]
        index = [b for b, per in enumerate(found) for _ in per]
        emb = self._embed(images, kps, index) if kps else None
        return self._score(emb, found, refs, images)

    def on_latents(self, latents: torch.Tensor, decode: Decode, refs: Sequence[torch.Tensor], margin: int = 4,
                   detect_decode: Decode | None = None) -> IdLossResult:
        """``loss.id_decode=crop``: the same loss, decoding with gradient only each face's latent window.

        latents: ``[b, C, 1, h, w]`` (differentiable); decode: latents -> ``[b, 3, f*h, f*w]`` in [0, 1] (any
        latent window, translation-equivariant up to its receptive field, e.g. :func:`vae_decoder`);
        detect_decode: the no-grad decode for detection (default ``decode``; a tiled one bounds its memory);
        margin: latent cells around each face's crop region (larger = closer to ``full``).
        """
        from ..faces.arcface import crop_faces

        with torch.no_grad():
            images = (detect_decode or decode)(latents.detach())
        h, w = latents.shape[-2:]
        factor = images.shape[-1] // w
        if factor < 1 or tuple(images.shape[-2:]) != (factor * h, factor * w):
            raise InputError(f"id_decode=crop needs a decoder that scales the latent grid by a whole factor; "
                             f"latents {h}x{w} decoded to {tuple(images.shape[-2:])}. Use loss.id_decode=full.")
        found = self._find(images)
        del images
        size, crops = self.arcface.input_size, []
        for b, per in enumerate(found):
            for kps in per:
                win = latent_window(crop_pixel_box(kps, size), factor, (h, w), margin)
                patch = decode(latents[b:b + 1, ..., win.y0:win.y1, win.x0:win.x1])  # [1, 3, f*(y1-y0), f*(x1-x0)]
                kps_t = torch.as_tensor(win.shift(kps, factor)[None], dtype=patch.dtype, device=patch.device)
                crops.append(crop_faces(patch, kps_t, torch.zeros(1, dtype=torch.long), size))
        emb = self.arcface(torch.cat(crops)) if crops else None
        return self._score(emb, found, refs, latents)
