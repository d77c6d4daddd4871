"""Preference data for group-level DPO (paper §3.4, Eq. 8-9): candidates, metrics, pairs, human review.

Pipeline (``python train/make_pairs.py build|review|apply``, or from Python)::

    from idglow_core.faces import load_analyzer
    from idglow_core.preference import MetricSuite, ClipEncoder, load_pairs_config, build_pairs
    from idglow_core.preference import write_review_page, apply_decisions, pipeline_generator
    from idglow_core.pipeline import IdGlowPipeline

    suite = MetricSuite(load_analyzer("auto"), aesthetic=None, clip=ClipEncoder.from_dir("models/clip"))
    cfg = load_pairs_config("train/configs/pairs_default.yaml", overrides=["thresholds.id=0.08"])
    generate = pipeline_generator(IdGlowPipeline.from_pretrained(model, adapter))  # or any f(refs, prompt, seed)
    build_pairs("groups.jsonl", "runs/pairs", suite, cfg, generate=generate)
    write_review_page("runs/pairs/pairs.jsonl", "runs/pairs/review.html")       # a person accepts/rejects
    apply_decisions("runs/pairs/pairs.jsonl", "decisions.json", "runs/pairs/dpo.jsonl")

Modules: ``groups`` (input file), ``sources`` (generators; the IdGlowPipeline wrapper), ``perturb``
(reproducible degradations), ``metrics`` (phi_id, phi_aes, phi_sem, phi_obj), ``cache`` (scores keyed by
file hash), ``pairs`` (pair policy, Eq. 8-9), ``build`` (orchestration), ``review`` (HTML page, decisions,
DPO manifest), ``config`` (thresholds and settings).
"""
from __future__ import annotations

from .build import BuildResult, Generator, build_pairs
from .cache import ScoreCache, context_key, file_hash
from .config import METRICS, PairsConfig, config_to_dict, load_pairs_config
from .groups import Group, read_groups
from .metrics import ClipEncoder, MetricSuite, References, person_region
from .pairs import Candidate, compute_deltas, passing_metrics, propose_pairs
from .perturb import PERTURBATION_KINDS, Perturbation
from .sources import call_generator, pipeline_generator
from .review import apply_decisions, read_decisions, read_pairs, write_review_page

__all__ = ["BuildResult", "Generator", "build_pairs", "ScoreCache", "context_key", "file_hash", "METRICS",
           "PairsConfig", "config_to_dict", "load_pairs_config", "Group", "read_groups", "ClipEncoder",
           "MetricSuite", "References", "person_region", "Candidate", "compute_deltas", "passing_metrics",
           "propose_pairs", "PERTURBATION_KINDS", "Perturbation", "apply_decisions", "read_decisions",
           "read_pairs", "write_review_page", "call_generator", "pipeline_generator"]
