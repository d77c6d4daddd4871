"""FaceSim with Hungarian matching (paper Eq. 2) and the matched identity loss (Eq. 3).

Given ``k`` reference identities and ``m`` faces found in a generated image, the cosine matrix
``S[j, i] = cos(ref_j, gen_i)`` is ``[k, m]``. The assignment maximises the summed similarity over one-to-one
pairs (Eq. 2), so a group photo is scored regardless of where each person ended up in the frame.

Two summaries, because the paper's "FaceSim" is ambiguous when a face is missing:

- ``strict``: sum of matched similarities / k. A reference with no generated face counts 0 (the paper's Eq. 3
  averages over all k references).
- ``matched``: the mean over matched pairs only (what most single-face evaluations report).

And one confusion measure from the multi-ID literature (WithAnyone's ID-Conf): for each reference, how far its
best generated face stands above the runner-up, ``(top1 - top2) / top1`` (:func:`id_conf`). 1 = one clear
match, 0 = two faces look equally like that person (the identities are blended or duplicated).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import InputError

__all__ = ["FaceSimResult", "match_identities", "cosine_matrix", "id_conf", "id_loss"]


@dataclass(frozen=True)
class FaceSimResult:
    """The outcome of matching ``k`` references to ``m`` generated faces.

    matrix: ``[k, m]`` cosine similarities. assignment: ``[k]`` index of each reference's generated face, -1 if
    none. similarity: ``[k]`` matched cosine per reference, 0.0 where unmatched. strict: ``sum(similarity) / k``.
    matched: mean over matched pairs (NaN when nothing matched). count_ok: ``m == k``. confusion: mean
    similarity of the pairs off the assignment between matched references and generated faces (how alike the
    *wrong* people look; NaN where there are none). id_conf: ``[k]`` ID-Conf per reference (:func:`id_conf`);
    id_conf_mean: their mean over references where it is defined (NaN when none is).
    """

    matrix: np.ndarray
    assignment: np.ndarray
    similarity: np.ndarray
    strict: float
    matched: float
    count_ok: bool
    confusion: float
    id_conf: np.ndarray
    id_conf_mean: float

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None)."""
        def clean(x: float):
            return None if x != x else float(x)
        return {
            "assignment": [int(a) for a in self.assignment],
            "similarity": [float(s) for s in self.similarity],
            "facesim_strict": clean(self.strict),
            "facesim_matched": clean(self.matched),
            "count_ok": bool(self.count_ok),
            "confusion": clean(self.confusion),
            "id_conf": [clean(float(c)) for c in self.id_conf],
            "id_conf_mean": clean(self.id_conf_mean),
        }


def _as_2d(name: str, x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D array of embeddings [count, dim], got shape {tuple(arr.shape)}. "
                         f"Stack one embedding per face.")
    return arr


def cosine_matrix(ref, gen) -> np.ndarray:
    """``[k, m]`` cosine similarities between rows of ``ref [k, d]`` and ``gen [m, d]`` (re-normalised, so
    slightly off-unit embeddings are fine)."""
    ref, gen = _as_2d("ref", ref), _as_2d("gen", gen)
    if gen.shape[0] == 0:
        return np.zeros((ref.shape[0], 0))
    if ref.shape[1] != gen.shape[1]:
        raise InputError(f"Reference embeddings are {ref.shape[1]}-d but generated-face embeddings are "
                         f"{gen.shape[1]}-d. Embed both with the same face backend.")
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    gen = gen / np.maximum(np.linalg.norm(gen, axis=1, keepdims=True), 1e-12)
    return ref @ gen.T


def id_conf(matrix) -> np.ndarray:
    """ID-Conf per reference from the ``[k, m]`` cosine matrix: ``(top1 - top2) / top1`` over the m faces.

    top1/top2 are the reference's best and second-best cosine over the generated faces, negative cosines counted
    as 0 (a face less like the person than a random one is no rival). With one face, top2 = 0 and ID-Conf = 1.
    NaN where it is undefined: no face (m = 0) or top1 <= 0 (no face resembles the reference at all).
    Example: cosines [0.8, 0.6] -> (0.8 - 0.6) / 0.8 = 0.25.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise InputError(f"id_conf expects a [k, m] cosine matrix, got shape {matrix.shape}.")
    k, m = matrix.shape
    out = np.full(k, np.nan)
    if m == 0:
        return out
    top = -np.sort(-np.maximum(matrix, 0.0), axis=1)  # descending per reference
    top1 = top[:, 0]
    top2 = top[:, 1] if m > 1 else np.zeros(k)
    ok = top1 > 0
    out[ok] = (top1[ok] - top2[ok]) / top1[ok]
    return out


def _assign(matrix: np.ndarray) -> np.ndarray:
    """Eq. 2: the one-to-one assignment maximising the summed similarity; -1 for unmatched references."""
    k, m = matrix.shape
    assignment = np.full(k, -1, dtype=np.int64)
    if k == 0 or m == 0:
        return assignment
    rows, cols = linear_sum_assignment(matrix, maximize=True)  # Eq. 2 (rectangular: min(k, m) pairs)
    assignment[rows] = cols
    return assignment


def match_identities(ref, gen) -> FaceSimResult:
    """Match reference identities ``ref [k, d]`` to generated faces ``gen [m, d]`` (L2-normalised embeddings).

    Works for m < k (some references get -1), m = k, m > k (extra faces stay unmatched) and m = 0.
    """
    ref_arr = _as_2d("ref", ref)
    k = ref_arr.shape[0]
    if k == 0:
        raise InputError("No reference identities were given (ref has 0 rows). Pass at least one reference "
                         "embedding.")
    matrix = cosine_matrix(ref_arr, gen)
    m = matrix.shape[1]
    assignment = _assign(matrix)
    hit = assignment >= 0
    similarity = np.where(hit, matrix[np.arange(k), np.where(hit, assignment, 0)] if m else 0.0, 0.0)
    strict = float(similarity.sum() / k)  # Eq. 3 form: average over all k references, missing = 0
    matched = float(similarity[hit].mean()) if hit.any() else float("nan")
    # Off-assignment pairs among matched references x matched generated faces.
    used_cols = assignment[hit]
    if hit.sum() >= 2:
        sub = matrix[np.ix_(np.flatnonzero(hit), used_cols)]
        off = sub[~np.eye(len(used_cols), dtype=bool)]
        confusion = float(off.mean())
    else:
        confusion = float("nan")
    conf = id_conf(matrix)
    conf_mean = float(np.nanmean(conf)) if np.isfinite(conf).any() else float("nan")
    return FaceSimResult(matrix=matrix, assignment=assignment, similarity=similarity, strict=strict,
                         matched=matched, count_ok=(m == k), confusion=confusion, id_conf=conf,
                         id_conf_mean=conf_mean)


def id_loss(ref: torch.Tensor, gen: torch.Tensor, missing_value: float = 1.0) -> torch.Tensor:
    """Eq. 3: ``(1/k) * sum_j (1 - cos(ref_j, gen_sigma(j)))`` with sigma from Eq. 2.

    ref: ``[k, d]`` reference embeddings (usually constants). gen: ``[m, d]`` embeddings of the faces found in
    the generated image, differentiable. The Hungarian matching runs on detached similarities; the loss is
    differentiable with respect to ``gen`` (and ``ref`` if it requires grad). A reference without a matched
    face (m < k) contributes ``missing_value`` (1.0: a missing face is the worst case, cosine 0). Returns a
    scalar tensor.
    """
    if ref.ndim != 2 or gen.ndim != 2:
        raise InputError(f"id_loss expects ref [k, d] and gen [m, d], got {tuple(ref.shape)} and "
                         f"{tuple(gen.shape)}.")
    k = ref.shape[0]
    if k == 0:
        raise InputError("id_loss needs at least one reference embedding (ref has 0 rows).")
    if gen.shape[0] == 0:
        return ref.new_tensor(missing_value) + 0.0 * ref.sum()  # every reference missing
    if ref.shape[1] != gen.shape[1]:
        raise InputError(f"id_loss: reference embeddings are {ref.shape[1]}-d, generated {gen.shape[1]}-d. Use "
                         f"the same face encoder for both.")
    cos = torch.nn.functional.normalize(ref, dim=-1) @ torch.nn.functional.normalize(gen, dim=-1).T  # [k, m]
    assignment = _assign(cos.detach().double().cpu().numpy())  # Eq. 2 on detached similarities
    hit = torch.as_tensor(assignment >= 0, device=cos.device)
    idx = torch.as_tensor(np.where(assignment >= 0, assignment, 0), device=cos.device)
    matched_cos = cos[torch.arange(k, device=cos.device), idx]
    per_ref = torch.where(hit, 1.0 - matched_cos, torch.full_like(matched_cos, missing_value))
    return per_ref.mean()  # Eq. 3
