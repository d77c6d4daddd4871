"""SFT rows from clustered faces, and the train/val split by identity.

A row is one target photo with ``min_faces``..``max_faces`` faces; each face's reference is the largest portrait
of the same identity cut from *another* photo that is not the same shot (a portrait whose embedding is almost
the target face's - cosine above ``same_shot_cosine`` - is a copy of the same picture). A reference cut from the
target itself teaches copy-paste: only with ``allow_self_refs``, and the row is marked (``self_ref``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["SftDataConfig", "SAME_SHOT_COSINE", "build_rows", "split_by_identity", "Skip"]

SAME_SHOT_COSINE = {"dlib": 0.985, "insightface": 0.90}
"""Above this cosine two faces are one picture (pasted or recompressed copies measure > 0.99 with dlib, while
different photos of one person measure 0.944-0.968)."""


@dataclass(frozen=True)
class SftDataConfig:
    """min_faces/max_faces: faces a target photo may hold (paper: groups of 2-4). allow_self_refs: fall back to
    the target's own face when an identity has no other portrait (rows marked). val_fraction: share of rows
    whose identities go to validation. threshold: same-person cosine (None = the backend's, see
    :mod:`.cluster`). same_shot_cosine: None = the backend's :data:`SAME_SHOT_COSINE`. dup_hamming: difference
    hash distance (of 64 bits) up to which two photos are near-duplicates. min_face_px: narrower faces are
    ignored. crop_margin: portrait crop margin, in face sizes on each side."""

    min_faces: int = 2
    max_faces: int = 4
    allow_self_refs: bool = False
    val_fraction: float = 0.1
    seed: int = 0
    threshold: float | None = None
    same_shot_cosine: float | None = None
    dup_hamming: int = 4
    min_face_px: int = 40
    crop_margin: float = 0.4
    task: str = "group"

    def __post_init__(self) -> None:
        if not 1 <= self.min_faces <= self.max_faces:
            raise ConfigError(f"Need 1 <= min_faces <= max_faces, got {self.min_faces}, {self.max_faces}.")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.dup_hamming < 0 or self.min_face_px < 1 or self.crop_margin < 0:
            raise ConfigError("dup_hamming >= 0, min_face_px >= 1 and crop_margin >= 0 are required.")


@dataclass(frozen=True)
class Skip:
    """Why a photo gave no row: a short ``code`` (counted in the report) and the details."""

    code: str
    detail: str


def _reference(i: int, faces: list[dict], labels: list, sim: np.ndarray, same_shot: float) -> int | None:
    """The largest face of face i's identity from another photo that is not the same shot, or None."""
    cands = [j for j, f in enumerate(faces) if labels[j] is not None and labels[j] == labels[i]
             and f["photo"] != faces[i]["photo"] and sim[i, j] < same_shot]
    def area(j: int) -> float:
        x1, y1, x2, y2 = faces[j]["bbox"]
        return (x2 - x1) * (y2 - y1)

    return max(cands, key=lambda j: (area(j), -j)) if cands else None


def build_rows(photos: list[dict], faces: list[dict], emb: np.ndarray, labels: list, config: SftDataConfig,
               same_shot: float, rejected_rows: set[str] = frozenset()) -> tuple[list[dict], dict[str, Skip]]:
    """Rows (without prompt and split) and ``{photo: Skip}`` for every readable photo that gave none.

    labels: the identity of each face (``None`` = the face was rejected in review)."""
    x = np.asarray(emb, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    by_photo: dict[str, list[int]] = {}
    for i, f in enumerate(faces):
        by_photo.setdefault(f["photo"], []).append(i)
    rows, skipped = [], {}
    for p in (p for p in photos if p["status"] == "ok"):
        name, idx = p["photo"], sorted(by_photo.get(p["photo"], []), key=lambda i: faces[i]["index"])
        n = len(idx)
        if n == 0:
            skipped[name] = Skip("no_face", "no face found")
        elif n < config.min_faces:
            skipped[name] = Skip("too_few_faces", f"{n} face(s), fewer than {config.min_faces}: a portrait source only")
        elif n > config.max_faces:
            skipped[name] = Skip("too_many_faces", f"{n} faces, more than {config.max_faces}: a portrait source only")
        elif any(labels[i] is None for i in idx):
            skipped[name] = Skip("rejected_face", "a face in it was rejected in review")
        elif len({labels[i] for i in idx}) < n:
            skipped[name] = Skip("repeated_identity", "two of its faces are one identity")
        elif name in rejected_rows:
            skipped[name] = Skip("rejected_row", "rejected in review")
        else:
            refs, self_ref, missing = [], [], []
            for i in idx:
                j = _reference(i, faces, labels, sim, same_shot)
                if j is None and config.allow_self_refs:
                    j = i
                if j is None:
                    missing.append(labels[i])
                else:
                    refs.append(j)
                    self_ref.append(j == i)
            if missing:
                skipped[name] = Skip("no_other_portrait", f"identities {missing} have no portrait from another "
                                                          f"photo (allow_self_refs would cut one from this photo)")
                continue
            rows.append({"row_id": name, "target": name, "identities": [labels[i] for i in idx],
                         "target_faces": [faces[i]["face_id"] for i in idx],
                         "ref_faces": [faces[j]["face_id"] for j in refs],
                         "refs": [faces[j]["crop"] for j in refs], "ref_photos": [faces[j]["photo"] for j in refs],
                         "self_ref": any(self_ref), "self_ref_mask": self_ref, "task": config.task})
    return rows, skipped


def split_by_identity(rows: list[dict], val_fraction: float, seed: int) -> dict[str, str]:
    """``{row_id: "train" | "val"}`` such that no identity appears in both splits.

    Identities that share a row are one component; components, in a seeded order, go to val while they fit in
    ``ceil(val_fraction * rows)`` rows; if none fits, the smallest one goes, unless it holds every row."""
    parent: dict = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for r in rows:
        for other in r["identities"][1:]:
            parent[find(other)] = find(r["identities"][0])
    comps: dict = {}
    for r in rows:
        comps.setdefault(find(r["identities"][0]), []).append(r["row_id"])
    keys = sorted(comps, key=str)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    want = math.ceil(val_fraction * len(rows)) if val_fraction > 0 else 0
    val: list = []
    for key in order:
        if len(val) + len(comps[key]) <= want and len(val) + len(comps[key]) < len(rows):
            val += comps[key]
    if want and not val and order:
        smallest = min(order, key=lambda k: len(comps[k]))
        if len(comps[smallest]) < len(rows):
            val = comps[smallest]
    return {r["row_id"]: "val" if r["row_id"] in set(val) else "train" for r in rows}
