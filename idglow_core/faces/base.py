"""The face-analysis protocol shared by every backend.

A backend turns an RGB image into a list of :class:`Face` records, ordered left to right by box centre.
Embeddings are L2-normalised; keypoints are the 5 ArcFace points in image coordinates, in this order:
left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" = smaller x in the image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError, NoFaceError

__all__ = ["Face", "FaceAnalyzer", "sort_left_to_right", "pick_face", "DETECT_MAX_SIDE", "downscale_for_detection",
           "reference_matrix"]

# Working size of detection: a larger image is downscaled to this long side for the detector only (the
# landmarks, the crop and the embedding use the full-resolution image). A 24 MP photo at full size costs dlib
# ~13 s and 1.6 GB and gives spurious detections; group-photo faces stay well above the detector's minimum here.
DETECT_MAX_SIDE = 2048


@dataclass(frozen=True)
class Face:
    """One detected face.

    bbox: ``[4]`` float32 ``(x1, y1, x2, y2)`` in pixels. kps: ``[5, 2]`` float32 ArcFace keypoints.
    score: detector confidence (backend-specific scale). embedding: ``[d]`` float32, unit L2 norm.
    """

    bbox: np.ndarray
    kps: np.ndarray
    score: float
    embedding: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))

    @property
    def center_x(self) -> float:
        return float(self.bbox[0] + self.bbox[2]) / 2.0


@runtime_checkable
class FaceAnalyzer(Protocol):
    """What every backend provides. ``analyze`` takes ``[H, W, 3]`` uint8 RGB."""

    name: str
    embedding_dim: int

    def analyze(self, image: np.ndarray) -> list[Face]:
        """Detect, align and embed every face; return them ordered left to right."""
        ...


def downscale_for_detection(rgb: np.ndarray, max_side: int = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """``([h, w, 3] uint8, scale)``: the image shrunk so its long side is at most ``max_side`` (area-averaged),
    and the factor applied (1.0 = unchanged). Divide detected coordinates by ``scale`` to map them back."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX), dtype=np.uint8)
    return small, scale


def sort_left_to_right(faces: Sequence[Face]) -> list[Face]:
    """Order faces by box centre x (ties broken by centre y), as every backend must return them."""
    return sorted(faces, key=lambda f: (f.center_x, float(f.bbox[1] + f.bbox[3]) / 2.0))


def pick_face(faces: Sequence[Face], index: int | None = None, *, label: str = "the image") -> Face:
    """Choose a reference face: the largest one, or ``faces[index]`` (left-to-right order) when given.

    Raises :class:`NoFaceError` when there is none and :class:`InputError` for an index out of range.
    """
    if not faces:
        raise NoFaceError(f"No face found in {label}. Use a sharper, well-lit, frontal photo in which the "
                          f"face is at least ~80 px wide, or crop the image closer to the face.")
    if index is None:
        return max(faces, key=lambda f: f.area)
    if not -len(faces) <= index < len(faces):
        raise InputError(f"Face index {index} requested for {label}, but only {len(faces)} face(s) were "
                         f"found (indices 0..{len(faces) - 1}, left to right). Pick a valid index or leave it "
                         f"unset to use the largest face.")
    return faces[index]


def reference_matrix(references, analyzer: "FaceAnalyzer") -> np.ndarray:
    """Reference identities as a ``[k, d]`` float64 array, checked against the analyzer that will score images
    with them (k >= 1, d = its embedding size). references: ``[k, d]`` tensor or array."""
    refs = np.asarray(references.detach().cpu() if hasattr(references, "detach") else references, np.float64)
    if refs.ndim != 2 or refs.shape[0] == 0:
        raise InputError(f"Reference embeddings must be [k, d] with k >= 1, got {tuple(refs.shape)}.")
    if refs.shape[1] != analyzer.embedding_dim:
        raise InputError(f"The reference identities are {refs.shape[1]}-d but the '{analyzer.name}' analyzer makes "
                         f"{analyzer.embedding_dim}-d embeddings. Encode the references with the same face analyzer "
                         f"that scores the images.")
    return refs
