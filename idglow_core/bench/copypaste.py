"""The copy-paste measure of MultiID-Bench: does a generated face copy the reference photo, or look like the
person in another photo of them?

For one identity with reference face ``r``, the ground-truth face ``t`` (the same person in the real target
photo) and the generated face ``g``, with ``theta(a, b) = arccos(cos(a, b))`` the angle between embeddings::

    copy_paste = (theta(g, t) - theta(g, r)) / theta(t, r)

+1 when ``g`` is the reference itself (pasted), -1 when ``g`` is the ground truth, 0 half-way. Defined only
where the row has a ground-truth image and both the generated and the ground-truth face of that identity
were matched; ``theta(t, r) = 0`` (the reference *is* the target face) leaves it undefined (NaN).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, InputError, ManifestError
from ..facesim import cosine_matrix, match_identities
from ..images import load_image

__all__ = ["angle", "copy_paste", "copy_paste_scores", "ground_truth_record"]

GROUND_TRUTH_KEY = "target"
"""The manifest key of a row's ground-truth image (the real group photo the references were cut from)."""


def angle(a, b) -> np.ndarray:
    """``[n]`` angles (radians) between rows of ``a [n, d]`` and ``b [n, d]``: ``arccos`` of the cosine."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise InputError(f"angle: both inputs must be [n, d] of the same shape, got {a.shape} and {b.shape}.")
    cos = np.diagonal(cosine_matrix(a, b)) if len(a) else np.zeros(0)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def copy_paste(gen, target, ref, eps: float = 1e-6) -> np.ndarray:
    """``[n]`` copy-paste values, one per identity; inputs are ``[n, d]`` embeddings, row i = identity i.

    Example (2-d): r = (1, 0), t = (0, 1), g = (cos 30deg, sin 30deg): theta(g,t) = 60deg, theta(g,r) = 30deg,
    theta(t,r) = 90deg -> (60 - 30) / 90 = 1/3.
    """
    g_t, g_r, t_r = angle(gen, target), angle(gen, ref), angle(target, ref)
    out = np.full(len(t_r), np.nan)
    ok = t_r > eps
    out[ok] = (g_t[ok] - g_r[ok]) / t_r[ok]
    return out


def copy_paste_scores(ref, gen, gen_assignment, target, target_assignment) -> np.ndarray:
    """``[k]`` copy-paste per reference from the Hungarian assignments (-1 = unmatched -> NaN).

    ref: ``[k, d]``; gen: ``[m, d]`` generated faces, ``gen_assignment[j]`` the face of reference j;
    target: ``[p, d]`` ground-truth faces, ``target_assignment[j]`` likewise.
    """
    ref = np.asarray(ref, np.float64)
    out = np.full(len(ref), np.nan)
    for j, (a, b) in enumerate(zip(gen_assignment, target_assignment)):
        if a >= 0 and b >= 0:
            out[j] = copy_paste(np.asarray(gen)[a][None], np.asarray(target)[b][None], ref[j][None])[0]
    return out


def _clean(x: float):
    return None if x != x else float(x)


def ground_truth_record(analyzer, target: str | Path, base: Path, ref: np.ndarray, gen: np.ndarray,
                        gen_assignment, line: int, cache: dict | None = None) -> dict:
    """The copy-paste fields of one evaluated row with a ground-truth image ``target`` (relative to ``base``).

    ref ``[k, d]``, gen ``[m, d]``: the row's reference and generated embeddings; gen_assignment: ``[k]``.
    cache: ``{path: [p, d] ground-truth embeddings}`` shared across rows, so each photo is detected once.
    Returns ``{"copy_paste": [k] (None where undefined), "copy_paste_mean": float | None, "target_faces": p}``.
    """
    path = Path(target).expanduser()
    path = path if path.is_absolute() else base / path
    cache = {} if cache is None else cache
    if path not in cache:
        try:
            faces = analyzer.analyze(load_image(path))
        except ImageReadError as exc:
            raise ManifestError(f"line {line}: ground-truth '{GROUND_TRUTH_KEY}' image: {exc}") from exc
        cache[path] = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, ref.shape[1]))
    tgt = cache[path]
    tgt_match = match_identities(ref, tgt)
    cp = copy_paste_scores(ref, gen, gen_assignment, tgt, tgt_match.assignment)
    mean = float(np.nanmean(cp)) if np.isfinite(cp).any() else math.nan
    return {"copy_paste": [_clean(float(c)) for c in cp], "copy_paste_mean": _clean(mean), "target_faces": len(tgt)}
