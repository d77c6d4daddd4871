"""``bench build``: identity portraits -> the paper's test set (Sec. 4.1) as ``bench.jsonl``.

For each k in ``ks`` (paper: 2 and 3), ``sets_per_k`` distinct identity sets are drawn with a seeded generator
(``numpy.random.default_rng([seed, k])``, so adding k = 3 never changes the k = 2 sets). Every set gives one
row per task (Task 1 ``group`` and Task 2 ``age`` use the *same* identity sets, as the paper requires) and per
prompt mode: ``static`` (the template of :mod:`idglow_core.prompting.templates`) and ``dynamic`` (the VLM
enricher's prompt; only when a VLM is given, otherwise ``bench.json`` says the dynamic rows were left out).
Rows of one set share the generation seed, so methods and modes are compared on paired samples.

Written to ``out_dir``: ``refs/<identity>.<ext>`` (the chosen portrait of each identity, copied),
``bench.jsonl`` (one row per generation, paths relative to it) and ``bench.json`` (config, identity sets,
skipped identities with their reason). Row::

    {"id": "k2-s000-group-static", "set": "k2-s000", "k": 2, "identities": ["a", "b"],
     "refs": ["refs/a.jpg", "refs/b.jpg"], "task": "group", "prompt_mode": "static", "prompt": "...",
     "prompt_source": "static", "seed": 1000}

:func:`build_bench_from_sft` makes Task 1 rows from an SFT manifest instead (e.g. the ``val.jsonl`` of
``train/make_sft_data.py``): each row keeps its real group photo as the ground truth (``target``), so
``evaluate`` also reports MultiID-Bench's copy-paste measure.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ImageReadError, InputError
from ..images import load_image
from ..jsonl import write_jsonl_atomic
from ..prompting.templates import TASKS, static_prompt
from .identities import Identity, read_identities

__all__ = ["BenchConfig", "build_bench", "build_bench_from_sft", "draw_sets"]

log = logging.getLogger("idglow")


@dataclass(frozen=True)
class BenchConfig:
    """ks: subjects per image (paper: 2, 3). sets_per_k: identity sets per k (fewer when the identities do not
    allow that many distinct sets). seed: draws the sets, the portraits and the generation seeds
    (``seed * 1000 + set index``). tasks: 'group' (Task 1) and/or 'age' (Task 2)."""

    ks: tuple[int, ...] = (2, 3)
    sets_per_k: int = 50
    seed: int = 0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers, got {self.ks}. The paper uses 2 and 3.")
        if self.sets_per_k < 1:
            raise ConfigError(f"sets_per_k must be >= 1, got {self.sets_per_k}.")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks must be among {TASKS}, got {self.tasks}.")


def draw_sets(names: list[str], k: int, n: int, seed: int) -> list[tuple[str, ...]]:
    """``min(n, C(len(names), k))`` distinct k-sets of ``names``, each in a seeded left-to-right order."""
    rng = np.random.default_rng([seed, k])
    total = math.comb(len(names), k)
    n = min(n, total)
    if total <= 200_000:
        combos = list(itertools.combinations(sorted(names), k))
        chosen = [combos[i] for i in sorted(rng.choice(total, size=n, replace=False))]
    else:  # too many to list: rejection-sample distinct sets
        seen: set = set()
        chosen = []
        while len(chosen) < n:
            combo = tuple(sorted(rng.choice(sorted(names), size=k, replace=False)))
            if combo not in seen:
                seen.add(combo)
                chosen.append(combo)
    return [tuple(combo[i] for i in rng.permutation(k)) for combo in chosen]


def _choose_portraits(identities: list[Identity], seed: int, analyzer) -> tuple[dict[str, Path], dict[str, str]]:
    """One portrait per identity (seeded; the first in the seeded order that reads and, with ``analyzer``,
    holds a face). Returns ``({name: portrait}, {name: reason skipped})``."""
    rng = np.random.default_rng(seed)
    chosen, skipped = {}, {}
    for ident in identities:
        order = [ident.portraits[i] for i in rng.permutation(len(ident.portraits))]
        reasons = []
        for path in order:
            try:
                image = load_image(path)
            except ImageReadError as exc:
                reasons.append(f"{path.name}: unreadable ({exc})")
                continue
            if analyzer is not None and not analyzer.analyze(image):
                reasons.append(f"{path.name}: no face found")
                continue
            chosen[ident.name] = path
            break
        else:
            skipped[ident.name] = "; ".join(reasons) or "no portrait"
    return chosen, skipped


def _dynamic_prompt(vlm, refs: list[Path], task: str, k: int, seed: int, enrich_config) -> tuple[str, str]:
    from ..prompting.enricher import enrich_prompt

    result = enrich_prompt(vlm, [load_image(r) for r in refs], "", task=task, k=k, seed=seed, config=enrich_config)
    return result.prompt, result.source


def build_bench(identities_dir: str | os.PathLike, out_dir: str | os.PathLike, config: BenchConfig | None = None,
                analyzer=None, vlm=None, enrich_config=None) -> dict:
    """Write the test set into ``out_dir`` (see the module doc); return the ``bench.json`` content.

    analyzer: optional face backend; identities whose portraits hold no face are then skipped (reason recorded).
    vlm: optional :class:`idglow_core.prompting.vlm.VLMBundle` for the dynamic prompts, decoded with
    ``enrich_config`` (:class:`idglow_core.prompting.enricher.EnrichConfig`; None = its defaults). A prompt that
    fails the enricher's validation falls back to the template: the row then says ``prompt_source: static``.
    """
    config = config or BenchConfig()
    out = Path(out_dir)
    identities = read_identities(identities_dir)
    portraits, skipped = _choose_portraits(identities, config.seed, analyzer)
    names = sorted(portraits)
    if len(names) < min(config.ks):
        raise InputError(f"Only {len(names)} usable identities in '{identities_dir}' (skipped: {skipped}); k = "
                         f"{min(config.ks)} needs at least that many. Add portraits.")
    (out / "refs").mkdir(parents=True, exist_ok=True)
    ref_rel = {}
    for name in names:
        dest = out / "refs" / f"{name}{portraits[name].suffix.lower()}"
        shutil.copyfile(portraits[name], dest)
        ref_rel[name] = dest.relative_to(out).as_posix()
    modes = ["static"] + (["dynamic"] if vlm is not None else [])
    rows, sets_info = [], {}
    for k in config.ks:
        if len(names) < k:
            sets_info[f"k{k}"] = f"skipped: {len(names)} identities < k = {k}"
            continue
        sets = draw_sets(names, k, config.sets_per_k, config.seed)
        sets_info[f"k{k}"] = [list(s) for s in sets]
        for i, ids in enumerate(sets):
            set_id, gen_seed = f"k{k}-s{i:03d}", config.seed * 1000 + i
            refs = [ref_rel[n] for n in ids]
            for task in config.tasks:
                for mode in modes:
                    prompt, source = static_prompt(task, k), "static"
                    if mode == "dynamic":
                        prompt, source = _dynamic_prompt(vlm, [out / r for r in refs], task, k, gen_seed,
                                                         enrich_config)
                    rows.append({"id": f"{set_id}-{task}-{mode}", "set": set_id, "k": k, "identities": list(ids),
                                 "refs": refs, "task": task, "prompt_mode": mode, "prompt": prompt,
                                 "prompt_source": source, "seed": gen_seed})
    write_jsonl_atomic(rows, out / "bench.jsonl")
    info = {"config": {**asdict(config), "ks": list(config.ks), "tasks": list(config.tasks)},
            "identities": {n: str(portraits[n]) for n in names}, "skipped_identities": skipped, "sets": sets_info,
            "prompt_modes": modes, "rows": len(rows),
            "dynamic": "enricher" if vlm is not None else "left out: no VLM given (rows are static only)"}
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, out / "bench.json")
    log.info("bench: %d rows (%s) from %d identities -> %s", len(rows), ", ".join(sets_info), len(names), out)
    return info


def build_bench_from_sft(manifest: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0, vlm=None,
                         enrich_config=None) -> dict:
    """Task 1 bench rows with ground truth from an SFT manifest (``target``, ``refs``, optional ``row_id``,
    ``identities``); paths are rewritten relative to ``out_dir/bench.jsonl``. Returns the ``bench.json`` content."""
    from ..jsonl import raise_problems, read_jsonl, resolve_path

    manifest, out = Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise InputError(f"SFT manifest '{manifest}' does not exist (e.g. val.jsonl of make_sft_data.py).")
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    rows = []
    modes = ["static"] + (["dynamic"] if vlm is not None else [])
    for i, (line, rec) in enumerate(read_jsonl(manifest, problems)):
        target, refs = rec.get("target"), rec.get("refs")
        if not isinstance(target, str) or not isinstance(refs, list) or not refs:
            problems.append(f"line {line}: needs 'target' (an image path) and 'refs' (a list of image paths)")
            continue
        paths = [resolve_path(manifest.parent, p) for p in (target, *refs)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            problems.append(f"line {line}: file(s) not found: {missing}")
            continue
        rel = [Path(os.path.relpath(p.resolve(), out.resolve())).as_posix() for p in paths]
        k, set_id = len(refs), f"sft-{i:04d}"
        for mode in modes:
            prompt, source = static_prompt("group", k), "static"
            if mode == "dynamic":
                prompt, source = _dynamic_prompt(vlm, paths[1:], "group", k, seed * 1000 + i, enrich_config)
            rows.append({"id": f"{set_id}-group-{mode}", "set": set_id, "k": k, "source_row": rec.get("row_id", line),
                         "identities": rec.get("identities", [f"{set_id}-p{j}" for j in range(k)]), "refs": rel[1:],
                         "target": rel[0], "task": "group", "prompt_mode": mode, "prompt": prompt,
                         "prompt_source": source, "seed": seed * 1000 + i})
    raise_problems(problems, f"SFT manifest '{manifest}'")
    write_jsonl_atomic(rows, out / "bench.jsonl")
    info = {"source": str(manifest), "rows": len(rows), "prompt_modes": modes, "ground_truth": True,
            "dynamic": "enricher" if vlm is not None else "left out: no VLM given (rows are static only)"}
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, out / "bench.json")
    return info
