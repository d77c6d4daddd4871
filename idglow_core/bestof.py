"""Hungarian best-of-N: score candidate images against k reference identities and rank them.

Each candidate is scored with the paper's matching (Eq. 2) through :func:`~idglow_core.facesim.match_identities`:
strict FaceSim (missing references count 0), matched FaceSim, ``count_ok`` (as many faces as references) and
ID-Conf (per reference ``(top1 - top2) / top1``, WithAnyone/UMO's confusion measure).

Ranking rule (:func:`rank_candidates`), best first, compared in this order:

1. ``count_ok``: the right number of faces beats any score (a duplicated or missing person is a failed photo).
2. ``strict + aesthetic_weight * aesthetic``: strict FaceSim, plus an optional aesthetic term (LAION score,
   about 1..10) with a weight (0 = identity only; 0.01 lets one aesthetic point weigh as 0.01 cosine).
3. ``id_conf_mean``: the clearer the one-to-one match, the better (undefined counts as 0).
4. the candidate's index (earlier seed first), so the order is total and reproducible.

Example::

    scores = score_candidates(analyzer, ref_embeddings, images)          # one CandidateScore per image
    order = rank_candidates(scores)                                       # best first
    best = [images[s.index] for s in order[:2]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import InputError
from .faces.base import reference_matrix
from .facesim import FaceSimResult, match_identities

__all__ = ["CandidateScore", "score_candidates", "rank_candidates", "ranking_report"]


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's scores. index: its position in the batch; faces: faces found; facesim: the matching;
    aesthetic: the optional aesthetic score (None when not given)."""

    index: int
    faces: int
    facesim: FaceSimResult
    aesthetic: float | None = None

    @property
    def count_ok(self) -> bool:
        return bool(self.facesim.count_ok)

    @property
    def strict(self) -> float:
        return float(self.facesim.strict)

    @property
    def id_conf(self) -> float:
        """Mean ID-Conf over references; 0 where it is undefined (no face resembles anyone)."""
        value = float(self.facesim.id_conf_mean)
        return 0.0 if math.isnan(value) else value

    def key(self, aesthetic_weight: float = 0.0) -> tuple:
        """The sort key of the documented ranking rule (larger is better)."""
        value = self.strict + (aesthetic_weight * self.aesthetic if self.aesthetic is not None else 0.0)
        return (self.count_ok, value, self.id_conf, -self.index)

    def to_dict(self) -> dict:
        return {"index": self.index, "faces": self.faces, **self.facesim.to_dict(),
                "aesthetic": None if self.aesthetic is None else float(self.aesthetic)}


def score_candidates(analyzer, references, images: Sequence[np.ndarray],
                     aesthetic: Sequence[float] | None = None,
                     on_image: Callable[[], None] | None = None) -> list[CandidateScore]:
    """Score B candidates. analyzer: a face backend; references: ``[k, d]`` embeddings from the same backend;
    images: B ``[H, W, 3]`` uint8 RGB; aesthetic: optional B scores. Returns B scores in input order."""
    refs = reference_matrix(references, analyzer)
    if aesthetic is not None and len(aesthetic) != len(images):
        raise InputError(f"{len(aesthetic)} aesthetic scores for {len(images)} candidates; give one per image.")
    out = []
    for i, image in enumerate(images):
        faces = analyzer.analyze(np.ascontiguousarray(image))
        gen = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, refs.shape[1]))
        out.append(CandidateScore(i, len(faces), match_identities(refs, gen),  # Eq. 2 per candidate
                                  None if aesthetic is None else float(aesthetic[i])))
        if on_image is not None:
            on_image()
    return out


def rank_candidates(scores: Sequence[CandidateScore], aesthetic_weight: float = 0.0) -> list[CandidateScore]:
    """The candidates best first, by the rule in the module docstring."""
    if aesthetic_weight < 0 or not math.isfinite(aesthetic_weight):
        raise InputError(f"aesthetic_weight must be a finite number >= 0, got {aesthetic_weight}.")
    if aesthetic_weight > 0 and any(s.aesthetic is None for s in scores):
        raise InputError("aesthetic_weight > 0 but some candidates have no aesthetic score. Pass the scores or "
                         "set the weight to 0.")
    return sorted(scores, key=lambda s: s.key(aesthetic_weight), reverse=True)


def ranking_report(ranked: Sequence[CandidateScore], label: str = "candidate", first: int = 1) -> str:
    """One line per candidate, best first: rank, ``label`` with number ``first + index`` (e.g. the seed), faces,
    count_ok, strict, matched, ID-Conf."""
    lines = []
    for rank, s in enumerate(ranked, 1):
        r = s.facesim
        matched = "n/a" if math.isnan(r.matched) else f"{r.matched:.3f}"
        conf = "n/a" if math.isnan(r.id_conf_mean) else f"{r.id_conf_mean:.3f}"
        aes = "" if s.aesthetic is None else f", aesthetic {s.aesthetic:.2f}"
        lines.append(f"#{rank}: {label} {s.index + first}, {s.faces} face(s) for {len(r.assignment)} reference(s)"
                     f"{'' if r.count_ok else ' (count differs)'}; strict {r.strict:.3f}, matched {matched}, "
                     f"ID-Conf {conf}{aes}")
    return "\n".join(lines)
