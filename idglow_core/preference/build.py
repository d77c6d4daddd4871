"""Build preference pairs: collect candidates per group, score them (cached), propose pairs, filter (Eq. 8-9).

Per group: real anchors and listed generations; ``generate(refs, prompt, seed)`` for each configured seed
(saved as ``images/<group>/seed<s>.png``; an existing file is reused, not regenerated); scoring; the
perturbations of the perturbation sources (``images/<group>/<parent>__<kind><strength>-s<seed>.png``);
scoring of those; pairing and filtering. Written to ``out_dir`` (paths inside are relative to it):

- ``candidates.jsonl``: every image with its source, parent, parameters and phi values;
- ``pairs_raw.jsonl``: every proposed pair with ``delta`` (Eq. 8), ``passed`` and ``kept`` (Eq. 9);
- ``pairs.jsonl``: the kept pairs, the input of the human review (:mod:`idglow_core.preference.review`);
- ``pairs_config.yaml``: the config used; ``scores_cache.json``: the score cache (a rerun re-scores nothing).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from tqdm.auto import tqdm

from ..errors import IdGlowError, ImageReadError, InputError, ManifestError
from ..images import load_image, save_image_atomic, to_rgb_uint8
from ..jsonl import write_jsonl_atomic
from .cache import ScoreCache, context_key, file_hash
from .config import PairsConfig, config_to_dict
from .groups import Group, read_groups
from .metrics import MetricSuite, References
from .pairs import Candidate, best_generated, compute_deltas, passing_metrics, propose_pairs
from .sources import call_generator

__all__ = ["Generator", "BuildResult", "build_pairs", "write_jsonl_atomic", "relpath"]

log = logging.getLogger("idglow")

Generator = Callable[..., Any]
"""``generate(refs, prompt, seed) -> image``: refs are k ``[H, W, 3]`` uint8 RGB; the image is anything
:func:`idglow_core.images.to_rgb_uint8` accepts (numpy HWC, PIL). A ``task`` keyword, if the callable has
one, receives the group's task (see :mod:`idglow_core.preference.sources`)."""


@dataclass(frozen=True)
class BuildResult:
    """Counts of one run. ``scored`` = images scored now; ``cached`` = scores read from the cache."""

    groups: int
    candidates: int
    generated: int
    scored: int
    cached: int
    proposed: int
    kept: int
    out_dir: Path


def relpath(path: Path, start: Path) -> str:
    """``path`` relative to folder ``start`` with forward slashes (``..`` allowed)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


class _GroupScorer:
    """Scores the candidates of one group through the cache; references are analysed only when needed."""

    def __init__(self, group: Group, suite: MetricSuite, cache: ScoreCache):
        self.group, self.suite, self.cache = group, suite, cache
        self.context = context_key([file_hash(r) for r in group.refs], group.prompt, suite.signature)
        self._refs: References | None = None
        self.scored = self.cached = 0

    def _references(self) -> References:
        if self._refs is None:
            try:
                self._refs = self.suite.references([load_image(r) for r in self.group.refs])
            except IdGlowError as exc:
                raise ManifestError(f"group '{self.group.id}' (line {self.group.line}): {exc}") from exc
        return self._refs

    def score(self, cand: Candidate) -> None:
        digest = file_hash(cand.path)
        hit = self.cache.get(digest, self.context)
        if hit is not None:
            order = [*self.suite.score_keys, *(k for k in hit if k not in self.suite.score_keys)]
            cand.scores, self.cached = {k: hit[k] for k in order if k in hit}, self.cached + 1
            return
        try:
            image = load_image(cand.path)
        except ImageReadError as exc:
            raise ManifestError(f"group '{self.group.id}' (line {self.group.line}): {exc}") from exc
        cand.scores = self.suite.score(image, self._references(), self.group.prompt)
        self.cache.put(digest, self.context, cand.scores)
        self.scored += 1


def _generate(group: Group, folder: Path, seeds: Sequence[int], generate: Generator | None) -> list[Candidate]:
    out, refs = [], None
    for seed in seeds if generate is not None else ():
        path = folder / f"seed{seed}.png"
        if not path.is_file():  # resumable: an image made by an earlier run is reused
            refs = refs if refs is not None else [load_image(r) for r in group.refs]
            result = call_generator(generate, refs, group.prompt, seed, group.task)
            try:
                image = to_rgb_uint8(result)
            except InputError as exc:
                raise InputError(f"The generator returned something that is not an image for group "
                                 f"'{group.id}', seed {seed}: {exc}") from exc
            save_image_atomic(image, path)
        out.append(Candidate(f"seed{seed}", path, "generated", params={"seed": int(seed)}))
    return out


def _perturb(parents: Sequence[Candidate], folder: Path, config: PairsConfig) -> list[Candidate]:
    out = []
    for parent in parents:
        image = None
        for j, base in enumerate(config.perturbations):
            p = base.with_seed(config.perturb_seed + j)
            cid = f"{parent.id}__{p.name}"
            path = folder / f"{cid}.png"
            if not path.is_file():
                image = image if image is not None else load_image(parent.path)
                save_image_atomic(p.apply(image), path)
            out.append(Candidate(cid, path, "perturbed", parent=parent.id, params=p.to_dict()))
    return out


def _candidate_record(g: Group, c: Candidate, out: Path) -> dict:
    return {"group": g.id, "id": c.id, "image": relpath(c.path, out), "source": c.source, "parent": c.parent,
            "params": c.params, "phi": c.scores}


def _pair_record(g: Group, w: Candidate, l: Candidate, policy: str, config: PairsConfig, out: Path) -> dict:
    delta = compute_deltas(w.scores, l.scores)  # Eq. 8
    passed = passing_metrics(delta, config.thresholds)  # Eq. 9
    return {"pair_id": f"{g.id}:{w.id}>{l.id}", "group": g.id, "policy": policy,
            "chosen": relpath(w.path, out), "rejected": relpath(l.path, out),
            "refs": [relpath(r, out) for r in g.refs], "prompt": g.prompt, "task": g.task,
            "chosen_source": w.source, "rejected_source": l.source, "rejected_params": l.params,
            "phi_chosen": w.scores, "phi_rejected": l.scores, "delta": delta, "passed": passed,
            "kept": bool(passed)}


def _process_group(g: Group, out: Path, suite: MetricSuite, cache: ScoreCache, config: PairsConfig,
                   generate: Generator | None) -> tuple[list[Candidate], list[dict], _GroupScorer]:
    folder = out / "images" / g.id
    cands = [Candidate(f"real{i}", p, "real") for i, p in enumerate(g.anchors)]
    cands += [Candidate(f"gen{i}", p, "generated") for i, p in enumerate(g.generated)]
    cands += _generate(g, folder, config.seeds, generate)
    if not cands:
        raise ManifestError(f"group '{g.id}' (line {g.line}) has no candidates: give 'anchors' or 'generated' "
                            f"images, or a generator with at least one seed.")
    scorer = _GroupScorer(g, suite, cache)
    for c in cands:
        scorer.score(c)
    parents = [c for c in cands if c.source == "real"] if "real" in config.perturb_sources else []
    best = best_generated(cands) if "best_generated" in config.perturb_sources else None
    parents += [best] if best is not None else []
    perturbed = _perturb(parents, folder, config)
    for c in perturbed:
        scorer.score(c)
    cands += perturbed
    pairs = [_pair_record(g, w, l, policy, config, out) for w, l, policy in propose_pairs(cands, config.policies)]
    return cands, pairs, scorer


def build_pairs(groups_path: str | os.PathLike, out_dir: str | os.PathLike, suite: MetricSuite,
                config: PairsConfig | None = None, generate: Generator | None = None,
                progress: bool = True) -> BuildResult:
    """Run the whole data side of §3.4 up to (not including) the human review. See the module docstring."""
    config = config or PairsConfig()
    groups = read_groups(groups_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = ScoreCache(out / config.cache_name)
    cand_records, pair_records = [], []
    n_gen = scored = cached = 0
    for g in tqdm(groups, desc="groups", unit="group", disable=not progress):
        cands, pairs, scorer = _process_group(g, out, suite, cache, config, generate)
        cache.save()  # after every group: an interrupted run keeps what it scored
        cand_records += [_candidate_record(g, c, out) for c in cands]
        pair_records += pairs
        n_gen += sum(c.source == "generated" for c in cands)
        scored, cached = scored + scorer.scored, cached + scorer.cached
    write_jsonl_atomic(cand_records, out / "candidates.jsonl")
    write_jsonl_atomic(pair_records, out / "pairs_raw.jsonl")
    kept = [p for p in pair_records if p["kept"]]
    write_jsonl_atomic(kept, out / "pairs.jsonl")
    tmp = out / ".pairs_config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, out / "pairs_config.yaml")
    result = BuildResult(len(groups), len(cand_records), n_gen, scored, cached, len(pair_records), len(kept), out)
    log.info("pairs: %d groups, %d candidates (%d scored, %d from cache), %d proposed, %d kept -> %s",
             result.groups, result.candidates, scored, cached, result.proposed, result.kept, out / "pairs.jsonl")
    return result
