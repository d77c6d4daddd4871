"""Settings of the preference-pair pipeline: Eq. 9 thresholds, generation seeds, perturbations, pair policy.

A YAML file holds the same keys as :class:`PairsConfig` (see ``train/configs/pairs_default.yaml``)::

    thresholds: {id: 0.05, aes: 0.25, sem: 0.01, obj: 0.02}   # tau_i of Eq. 9; null = metric never decides
    seeds: [0, 1, 2, 3]
    perturbations:
      - {kind: noise, strength: 0.06}
    perturb_sources: [real, best_generated]
    policies: [anchor, best_worst, parent]

``load_pairs_config(path, overrides=["thresholds.id=0.1", "seeds=[0,1]"])`` applies ``key=value`` strings
(values parsed as YAML) on top of the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..yamlfile import read_yaml_mapping
from .perturb import Perturbation

__all__ = ["METRICS", "POLICIES", "PERTURB_SOURCES", "PairsConfig", "load_pairs_config", "config_to_dict"]

METRICS = ("id", "aes", "sem", "obj")  # phi_id, phi_aes, phi_sem, phi_obj (paper §3.4)
POLICIES = ("anchor", "best_worst", "parent")
PERTURB_SOURCES = ("real", "best_generated")

# Default thresholds, with the unit each is in:
#   id  - FaceSim strict (mean matched cosine, missing face = 0). 0.05 = one of two faces drops by 0.1.
#   aes - LAION aesthetic score (about 1..10). 0.25 is a visible but modest quality difference.
#   sem - CLIP image-text cosine; CLIP cosines span little, so a small gap already means something.
#   obj - mean CLIP cosine of the face-masked person regions against the references.
DEFAULT_THRESHOLDS = {"id": 0.05, "aes": 0.25, "sem": 0.01, "obj": 0.02}


def _default_perturbations() -> list[Perturbation]:
    return [Perturbation("noise", 0.06), Perturbation("saturation", 0.35), Perturbation("jpeg", 12),
            Perturbation("blur", 2.0)]


@dataclass
class PairsConfig:
    """How candidates are made, paired and filtered.

    thresholds: ``tau_i`` per metric (Eq. 9); a pair is kept when some ``Delta_i > tau_i``. ``None`` (or a
    metric left out) means that metric is recorded but never makes a pair pass.
    seeds: seeds passed to the generator, one generation per seed and group.
    perturbations: the controlled degradations applied to each perturbation source.
    perturb_seed: base seed; perturbation ``j`` of a parent uses ``perturb_seed + j``.
    perturb_sources: ``real`` (every anchor) and/or ``best_generated`` (the group's best generation).
    policies: which pairs are proposed (see :mod:`idglow_core.preference.pairs`).
    obj_context: size of the person region around a face for ``phi_obj``, in face widths either side.
    cache_name: file name of the score cache inside the output folder.
    """

    thresholds: dict[str, float | None] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    perturbations: list[Perturbation] = field(default_factory=_default_perturbations)
    perturb_seed: int = 0
    perturb_sources: list[str] = field(default_factory=lambda: list(PERTURB_SOURCES))
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    obj_context: float = 1.5
    cache_name: str = "scores_cache.json"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.thresholds) - set(METRICS))
        if unknown:
            raise ConfigError(f"Unknown metric(s) {unknown} in thresholds. Use {list(METRICS)}.")
        for name, tau in self.thresholds.items():
            if tau is not None and not isinstance(tau, (int, float)):
                raise ConfigError(f"thresholds.{name} must be a number or null, got {tau!r}.")
        if not any(t is not None for t in self.thresholds.values()):
            raise ConfigError("Every threshold is null, so Eq. 9 would drop every pair. Set at least one "
                              "(e.g. thresholds.id=0.05).")
        if not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"seeds must be a list of integers, got {self.seeds!r}.")
        self.perturbations = [p if isinstance(p, Perturbation) else _perturbation(p) for p in self.perturbations]
        for key, allowed in (("perturb_sources", PERTURB_SOURCES), ("policies", POLICIES)):
            bad = [v for v in getattr(self, key) if v not in allowed]
            if bad:
                raise ConfigError(f"Unknown {key} {bad}. Choose from {list(allowed)}.")
        if not self.policies:
            raise ConfigError("policies is empty, so no pair would be proposed. Use e.g. [anchor, best_worst].")
        if not self.obj_context > 0:
            raise ConfigError(f"obj_context must be > 0 (face widths around each face), got {self.obj_context}.")

    def threshold(self, metric: str) -> float | None:
        """``tau_i`` for one metric, or None when that metric does not take part in Eq. 9."""
        return self.thresholds.get(metric)


def _perturbation(item: Any) -> Perturbation:
    if not isinstance(item, dict) or "kind" not in item or "strength" not in item:
        raise ConfigError(f"Each perturbation must be a mapping with 'kind' and 'strength', got {item!r}. "
                          f"Example: {{kind: noise, strength: 0.06}}.")
    extra = sorted(set(item) - {"kind", "strength"})
    if extra:
        raise ConfigError(f"Unknown perturbation key(s) {extra} in {item!r}; only 'kind' and 'strength' are used "
                          f"(the seed comes from perturb_seed).")
    return Perturbation(str(item["kind"]), float(item["strength"]))


def config_to_dict(cfg: PairsConfig) -> dict[str, Any]:
    """Plain dict (YAML/JSON-ready) of ``cfg``; perturbations as ``{kind, strength}`` mappings."""
    out = dataclasses.asdict(cfg)
    out["perturbations"] = [{"kind": p.kind, "strength": p.strength} for p in cfg.perturbations]
    return out


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. thresholds.id=0.1).")
        parsed = yaml.safe_load(value) if value.strip() else None
        head, dot, sub = key.partition(".")
        if dot:
            if head != "thresholds":
                raise ConfigError(f"Override '{item}': only thresholds.<metric> takes a dotted key.")
            raw["thresholds"] = {**dict(raw.get("thresholds") or DEFAULT_THRESHOLDS), sub: parsed}
        else:
            raw[head] = parsed
    return raw


def load_pairs_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PairsConfig:
    """Read a YAML config (defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw = _apply_overrides(read_yaml_mapping(path, "Pairs config", "train/configs/pairs_default.yaml"),
                           overrides or [])
    known = {f.name for f in dataclasses.fields(PairsConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"Unknown pairs-config key(s) {unknown}. Known keys: {sorted(known)}.")
    if "thresholds" in raw and not isinstance(raw["thresholds"], dict):
        raise ConfigError(f"thresholds must be a mapping like {{id: 0.05}}, got {raw['thresholds']!r}.")
    if "perturbations" in raw and not isinstance(raw["perturbations"], list):
        raise ConfigError("perturbations must be a list of {kind, strength} mappings (an empty list = none).")
    return PairsConfig(**raw)
