"""The matched identity loss of Algorithm 1 (lines 13-14) on decoded one-step estimates.

Faces are detected *without gradient* on the decoded image (the detector sees uint8 pixels), then cropped
differentiably with the detected keypoints and embedded by the torch ArcFace, so the gradient reaches the
image, the one-step estimate and the network. References are embedded once by the same encoder (Eq. 3 needs
both sides from the same F). Images without a detectable face get ``missing_value`` per reference.

The detector is injectable: ``detect(image [H, W, 3] uint8) -> list of [5, 2] keypoints``. The default wraps a
:class:`~idglow_core.faces.FaceAnalyzer`; tests inject a stub with fixed keypoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..facesim import id_loss

__all__ = ["Detector", "IdentityLoss", "IdLossResult", "analyzer_detector", "tiny_arcface"]

Detector = Callable[[np.ndarray], list]


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

    def __call__(self, images: torch.Tensor, refs: Sequence[torch.Tensor]) -> IdLossResult:
        """images: ``[b, 3, H, W]`` in [0, 1] (differentiable); refs: b tensors ``[k_i, D]``."""
        with torch.no_grad():
            pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            found = [self.detect(np.ascontiguousarray(p)) for p in pixels]
        kps = [k for per in found for k in per]
        index = [b for b, per in enumerate(found) for _ in per]
        emb = self._embed(images, kps, index) if kps else None
        losses, missing = [], []
        for b, ref in enumerate(refs):
            gen = emb[[i for i, j in enumerate(index) if j == b]] if emb is not None else images.new_zeros(0, ref.shape[1])
            ref = ref.to(device=images.device, dtype=gen.dtype if emb is not None else images.dtype)
            value = id_loss(ref, gen, missing_value=self.missing_value)  # Eq. 2-3 (Hungarian, detached)
            if gen.shape[0] == 0:
                value = value + 0.0 * images[b].sum()  # keep the graph connected for DDP
            losses.append(value)
            missing.append(max(0, ref.shape[0] - gen.shape[0]))
        return IdLossResult(torch.stack(losses), [len(f) for f in found], missing, [r.shape[0] for r in refs])
