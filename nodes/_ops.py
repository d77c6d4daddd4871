"""What the face nodes do, without ComfyUI: encode reference identities, score generated images, annotate.

Every function takes and returns plain numpy / torch objects so that tests run it without ``comfy``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from idglow_core.faces import Face, FaceAnalyzer, pick_face
from idglow_core.faces.align import norm_crop
from idglow_core.faces.base import reference_matrix
from idglow_core.facesim import FaceSimResult, match_identities

__all__ = ["IdentitySet", "encode_identities", "FaceSimSummary", "score_images", "annotate", "PALETTE"]

log = logging.getLogger("idglow")

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
CROP_SIZE = 112  # ArcFace alignment template size


@dataclass(frozen=True)
class IdentitySet:
    """The IDGLOW_IDS value passed between nodes.

    embeddings: ``[k, d]`` float32, unit L2 rows, in reference order. backend: the face backend that made them
    (embeddings of different backends are not comparable). crops: k aligned ``[112, 112, 3]`` uint8 faces.
    """

    embeddings: torch.Tensor
    backend: str
    crops: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def encode_identities(analyzer: FaceAnalyzer, images: Sequence[np.ndarray], face_index: int | None = None,
                      on_image: Callable[[], None] | None = None) -> IdentitySet:
    """One identity per reference image: the largest face, or face ``face_index`` counted left to right.

    images: k arrays ``[H, W, 3]`` uint8 RGB. Raises ``NoFaceError`` naming the image without a face.
    """
    faces: list[Face] = []
    for i, image in enumerate(images):  # one image at a time: the progress bar moves, errors name "image i of k"
        faces.append(pick_face(analyzer.analyze(image), face_index, label=f"reference image {i + 1} of {len(images)}"))
        if on_image is not None:
            on_image()
    emb = torch.from_numpy(np.stack([f.embedding for f in faces]).astype(np.float32))
    emb = torch.nn.functional.normalize(emb, dim=-1)
    crops = [norm_crop(np.ascontiguousarray(img), f.kps, CROP_SIZE) for img, f in zip(images, faces)]
    log.info("Encoded %d identities with the %s backend (%d-d)", len(faces), analyzer.name, emb.shape[1])
    return IdentitySet(embeddings=emb, backend=analyzer.name, crops=crops)


@dataclass
class FaceSimSummary:
    """FaceSim of a batch of generated images against k references (paper Eq. 2 matching per image).

    strict / matched: means over the batch (images where nothing matched are left out of ``matched``).
    results: one :class:`FaceSimResult` per image. faces: the faces found in each image, left to right.
    """

    strict: float
    matched: float
    results: list[FaceSimResult]
    faces: list[list[Face]]

    def report(self) -> str:
        lines = []
        for b, (res, faces) in enumerate(zip(self.results, self.faces)):
            k = len(res.assignment)
            pairs = ", ".join(f"ref {j + 1}->" + (f"face {int(a) + 1} ({res.similarity[j]:.3f})" if a >= 0 else "none")
                              for j, a in enumerate(res.assignment))
            matched = "n/a" if math.isnan(res.matched) else f"{res.matched:.4f}"
            lines.append(f"image {b + 1}: {len(faces)} face(s) for {k} reference(s){'' if res.count_ok else ' (count differs)'}; "
                         f"strict {res.strict:.4f}, matched {matched}; {pairs}")
        matched = "n/a (no face matched)" if math.isnan(self.matched) else f"{self.matched:.4f}"
        lines.append(f"FaceSim over {len(self.results)} image(s): strict {self.strict:.4f}, matched {matched}")
        return "\n".join(lines)


def score_images(analyzer: FaceAnalyzer, references: torch.Tensor, images: Sequence[np.ndarray],
                 on_image: Callable[[], None] | None = None) -> FaceSimSummary:
    """references: ``[k, d]`` unit embeddings; images: B generated ``[H, W, 3]`` uint8 images."""
    refs = reference_matrix(references, analyzer)
    results, all_faces = [], []
    for image in images:
        faces = analyzer.analyze(image)
        gen = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, refs.shape[1]))
        results.append(match_identities(refs, gen))  # Eq. 2 per image
        all_faces.append(faces)
        if on_image is not None:
            on_image()
    strict = float(np.mean([r.strict for r in results]))
    matched_vals = [r.matched for r in results if not math.isnan(r.matched)]
    matched = float(np.mean(matched_vals)) if matched_vals else float("nan")
    return FaceSimSummary(strict=strict, matched=matched, results=results, faces=all_faces)


def label_font(size: int) -> ImageFont.ImageFont:
    """A scalable font for the labels: DejaVu Sans when installed, else PIL's built-in one (scalable since
    Pillow 10.1)."""
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def annotate(image: np.ndarray, faces: Sequence[Face], result: FaceSimResult) -> np.ndarray:
    """Draw each face's box; matched faces get their reference number and cosine, the others '?' and their best
    cosine. image: ``[H, W, 3]`` uint8 -> a new annotated ``[H, W, 3]`` uint8 array."""
    out = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(out)
    owner = {int(a): j for j, a in enumerate(result.assignment) if a >= 0}
    width = max(2, round(min(out.size) / 200))
    font = label_font(max(12, round(min(out.size) / 24)))  # ~1/24 of the short side: readable at preview size
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        if i in owner:
            j = owner[i]
            colour, text = PALETTE[j % len(PALETTE)], f"#{j + 1} {result.matrix[j, i]:.2f}"
        else:
            best = float(result.matrix[:, i].max()) if result.matrix.size else float("nan")
            colour, text = (128, 128, 128), f"? {best:.2f}"
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(2, font.size // 6)
        ty = max(0.0, y1 - (bottom + 2 * pad))
        draw.rectangle([x1, ty, x1 + right + 2 * pad, ty + bottom + 2 * pad], fill=colour)
        draw.text((x1 + pad, ty + pad), text, fill=(255, 255, 255), font=font)
    return np.asarray(out)
