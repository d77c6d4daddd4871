"""Faces -> identities: average-linkage clustering at the backend's same-person cosine.

Thresholds (cosine of L2-normalised embeddings; a pair above it is taken as one person):

- ``dlib`` 0.92 (:data:`idglow_core.faces.DLIB_SAME_PERSON_COSINE`, dlib's own "L2 < 0.6" rule). Measured on the
  test photos: the three Obama photos 0.944-0.968 pairwise, Obama-Biden 0.80-0.82, the 15 pairs of different
  people in insightface's t1.jpg at most 0.906 (tests/test_sft_data.py re-measures them).
- ``insightface`` 0.40 (ArcFace w600k_r50). Not measured here (no buffalo_l weights on the build machine): the
  usual verification operating point of ArcFace models, where same-person cosines mostly lie above 0.5 and
  different people below 0.3. Pass ``threshold`` to override.

Average linkage joins two groups when their *mean* pairwise cosine passes the threshold, so one look-alike
pair cannot chain two people together (single linkage can). Two faces of one photo are different people: when
a cluster holds both, the one less like the rest of the cluster leaves it (as its own identity).
Memory is O(n^2) in the number of faces (about 20k faces per 1.6 GB); cluster large collections in parts.
"""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from ..errors import InputError
from ..faces.dlib_backend import DLIB_SAME_PERSON_COSINE

__all__ = ["SAME_PERSON_COSINE", "same_person_threshold", "cluster_faces"]

SAME_PERSON_COSINE = {"dlib": DLIB_SAME_PERSON_COSINE, "insightface": 0.40}


def same_person_threshold(backend: str, threshold: float | None = None) -> float:
    """``threshold`` when given, else the backend's value from :data:`SAME_PERSON_COSINE`."""
    if threshold is not None:
        if not -1.0 < threshold < 1.0:
            raise InputError(f"The same-person cosine threshold must be in (-1, 1), got {threshold}.")
        return float(threshold)
    if backend not in SAME_PERSON_COSINE:
        raise InputError(f"No same-person threshold is known for the face backend '{backend}'. Pass --threshold "
                         f"(the cosine above which two faces are one person).")
    return SAME_PERSON_COSINE[backend]


def _normed(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def cluster_faces(emb: np.ndarray, photo_of: list[str], threshold: float) -> np.ndarray:
    """``[n]`` identity labels 0, 1, ... (numbered by first face) for embeddings ``emb [n, d]``.

    photo_of: the photo of each face; faces of one photo never share a label."""
    n = len(emb)
    if n != len(photo_of):
        raise InputError(f"{n} embeddings but {len(photo_of)} photo names; give one per face.")
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    x = _normed(emb)
    raw = fcluster(linkage(x, method="average", metric="cosine"), t=1.0 - threshold, criterion="distance")
    sim = x @ x.T
    labels = raw.astype(np.int64)
    next_label = labels.max() + 1
    for lab in np.unique(raw):
        members = np.flatnonzero(labels == lab)
        # Cannot-link: per photo keep the face most like the rest of the cluster; the others leave.
        fit = {i: sim[i, members[members != i]].mean() if len(members) > 1 else 1.0 for i in members}
        by_photo: dict[str, list[int]] = {}
        for i in members:
            by_photo.setdefault(photo_of[i], []).append(i)
        for group in by_photo.values():
            for i in sorted(group, key=lambda j: -fit[j])[1:]:
                labels[i] = next_label
                next_label += 1
    order: dict[int, int] = {}  # renumber by first appearance, so labels follow the face order
    return np.array([order.setdefault(int(lab), len(order)) for lab in labels], np.int64)
