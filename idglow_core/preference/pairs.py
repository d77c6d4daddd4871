"""Candidates, the pairing policy, and the Eq. 8-9 filter.

A group is one ``(refs, prompt)``; its candidates are real group photos (``real``), generations of the current
model (``generated``) and degradations of good images (``perturbed``). Pairing policy, in this order (a pair
proposed twice keeps its first label):

1. ``anchor``: every real photo is chosen over every generated and every perturbed candidate of its group.
   Authentic group photos are the paper's "absolute positive anchors".
2. ``best_worst``: among the group's generations (two or more), the best is chosen over the worst, ranked by
   ``phi_id`` first, then ``phi_aes``, ``phi_obj``, ``phi_sem`` (a metric that is off counts 0).
3. ``parent``: every perturbed candidate is rejected opposite the image it was made from.

The policy only proposes a direction; Eq. 8-9 then keep a proposed pair only when the chosen image is better by
more than ``tau_i`` on at least one metric, so an anchor that is worse on every metric is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .config import METRICS

__all__ = ["SOURCES", "Candidate", "compute_deltas", "passing_metrics", "rank_key", "best_generated",
           "propose_pairs"]

SOURCES = ("real", "generated", "perturbed")


@dataclass
class Candidate:
    """One image of a group. ``id`` is unique within the group; ``params`` records how it was made
    (generation seed, perturbation kind/strength/seed); ``scores`` are its phi values once scored."""

    id: str
    path: Path
    source: str
    parent: str | None = None
    params: dict = field(default_factory=dict)
    scores: dict | None = None


def compute_deltas(chosen: Mapping[str, float | None], rejected: Mapping[str, float | None]) -> dict[str, float]:
    """Eq. 8: ``Delta_i = phi_i(x_w, I) - phi_i(x_l, I)`` for every metric scored on both images."""
    out = {}
    for m in METRICS:
        w, l = chosen.get(m), rejected.get(m)
        if w is not None and l is not None:
            out[m] = float(w) - float(l)  # Eq. 8
    return out


def passing_metrics(deltas: Mapping[str, float], thresholds: Mapping[str, float | None]) -> list[str]:
    """Eq. 9: the metrics with ``Delta_i > tau_i``; the pair is kept when this list is not empty.

    A metric without a threshold (absent or None) never passes; a metric without a delta never passes."""
    passed = []
    for m in METRICS:
        tau = thresholds.get(m)
        if tau is not None and m in deltas and deltas[m] > tau:  # Eq. 9: exists i with Delta_i > tau_i
            passed.append(m)
    return passed


def rank_key(scores: Mapping[str, float | None]) -> tuple[float, ...]:
    """Sort key for "best generation": phi_id, then aes, obj, sem (None counts 0)."""
    return tuple(float(scores.get(m) or 0.0) for m in ("id", "aes", "obj", "sem"))


def _best_worst(generated: Sequence[Candidate]) -> tuple[Candidate, Candidate] | None:
    scored = [c for c in generated if c.scores is not None]
    if len(scored) < 2:
        return None
    ordered = sorted(scored, key=lambda c: rank_key(c.scores))
    best, worst = ordered[-1], ordered[0]
    return None if rank_key(best.scores) == rank_key(worst.scores) else (best, worst)


def best_generated(candidates: Sequence[Candidate]) -> Candidate | None:
    """The group's best scored generation (by :func:`rank_key`), or None."""
    scored = [c for c in candidates if c.source == "generated" and c.scores is not None]
    return max(scored, key=lambda c: rank_key(c.scores)) if scored else None


def propose_pairs(candidates: Sequence[Candidate], policies: Sequence[str]) -> list[tuple[Candidate, Candidate, str]]:
    """``(chosen, rejected, policy)`` triples for one group, following the module's policy, without repeats."""
    by_id = {c.id: c for c in candidates}
    real = [c for c in candidates if c.source == "real"]
    others = [c for c in candidates if c.source in ("generated", "perturbed")]
    proposed: list[tuple[Candidate, Candidate, str]] = []
    if "anchor" in policies:
        proposed += [(w, l, "anchor") for w in real for l in others]
    if "best_worst" in policies:
        pair = _best_worst([c for c in candidates if c.source == "generated"])
        if pair is not None:
            proposed.append((pair[0], pair[1], "best_worst"))
    if "parent" in policies:
        proposed += [(by_id[c.parent], c, "parent") for c in candidates
                     if c.source == "perturbed" and c.parent in by_id]
    seen, unique = set(), []
    for w, l, policy in proposed:
        if (w.id, l.id) not in seen:
            seen.add((w.id, l.id))
            unique.append((w, l, policy))
    return unique
