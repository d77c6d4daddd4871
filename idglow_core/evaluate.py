"""Batch evaluation of generated group photos: FaceSim (Eq. 2-3) and the aesthetic score, paper-style tables.

Manifest: JSONL, one sample a line, paths relative to the manifest's folder::

    {"refs": ["a.jpg", "b.jpg"], "image": "gen/0001.png", "prompt": "...", "task": "group",
     "prompt_mode": "static", "method": "IdGlow"}

``task`` is ``group`` (Task 1) or ``age`` (Task 2); ``prompt_mode`` is ``static`` or ``dynamic``; ``method``
names the row of the table. A row may name its ground-truth image under ``target`` (the real group photo the
references were cut from): the copy-paste measure is then computed (:mod:`idglow_core.bench.copypaste`).
Each distinct reference file is embedded once and each image is detected once.
Every problem with the manifest (bad JSON, missing keys, missing files, references without a face) is reported
at once, with line numbers, before any result is written.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .bench.copypaste import GROUND_TRUTH_KEY, ground_truth_record
from .errors import ImageReadError, ManifestError, NoFaceError
from .faces.base import Face, FaceAnalyzer, pick_face
from .facesim import match_identities
from .images import load_image
from .jsonl import raise_problems, read_jsonl, resolve_path, write_jsonl_atomic

__all__ = ["Sample", "read_manifest", "evaluate_manifest", "summarise", "format_tables"]

log = logging.getLogger("idglow")

TASKS = ("group", "age")
PROMPT_MODES = ("static", "dynamic")
TASK_TITLES = {"group": "Task 1 (direct group fusion)", "age": "Task 2 (age-transformed group)"}


@dataclass(frozen=True)
class Sample:
    """One manifest line, with paths resolved against the manifest's folder."""

    line: int
    refs: tuple[Path, ...]
    image: Path
    prompt: str = ""
    task: str = "group"
    prompt_mode: str = "static"
    method: str = "default"
    extra: dict = field(default_factory=dict)


def _parse(base: Path, lineno: int, rec: dict, problems: list[str]) -> Sample | None:
    refs, image = rec.get("refs"), rec.get("image")
    bad = []
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        bad.append("'refs' must be a non-empty list of file paths")
    if not isinstance(image, str) or not image:
        bad.append("'image' must be a file path")
    task, mode = rec.get("task", "group"), rec.get("prompt_mode", "static")
    if task not in TASKS:
        bad.append(f"'task' must be one of {TASKS}, got {task!r}")
    if mode not in PROMPT_MODES:
        bad.append(f"'prompt_mode' must be one of {PROMPT_MODES}, got {mode!r}")
    if bad:
        problems.append(f"line {lineno}: " + "; ".join(bad))
        return None
    known = {"refs", "image", "prompt", "task", "prompt_mode", "method"}
    return Sample(line=lineno, refs=tuple(resolve_path(base, r) for r in refs), image=resolve_path(base, image),
                  prompt=str(rec.get("prompt", "")), task=task, prompt_mode=mode,
                  method=str(rec.get("method", "default")), extra={k: v for k, v in rec.items() if k not in known})


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Parse and check a manifest. Raises :class:`ManifestError` listing every problem with its line number."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Manifest '{path}' does not exist. Pass a JSONL file with one sample per line.")
    problems: list[str] = []
    samples = []
    for lineno, rec in read_jsonl(path, problems):
        sample = _parse(path.parent, lineno, rec, problems)
        if sample is not None:
            problems += [f"line {lineno}: file not found: {f}" for f in (*sample.refs, sample.image) if not f.is_file()]
            samples.append(sample)
    raise_problems(problems, f"Manifest '{path}'")
    if not samples:
        raise ManifestError(f"Manifest '{path}' has no samples. Add one JSON object per line, e.g. "
                            '{"refs": ["a.jpg", "b.jpg"], "image": "gen.png", "task": "group"}.')
    return samples


def _embed_references(samples: list[Sample], analyzer: FaceAnalyzer, progress: bool = True) -> dict[Path, Face]:
    """Embed each distinct reference file once; report every unreadable or faceless reference at once."""
    first_line: dict[Path, int] = {}
    for s in samples:
        for r in s.refs:
            first_line.setdefault(r, s.line)
    faces, problems = {}, []
    for ref, line in tqdm(first_line.items(), desc="references", unit="img", leave=False, disable=not progress):
        try:
            faces[ref] = pick_face(analyzer.analyze(load_image(ref)), label=f"reference '{ref.name}'")
        except (NoFaceError, ImageReadError) as exc:
            problems.append(f"line {line}: {ref}: {exc}")
    if problems:
        raise ManifestError(f"{len(problems)} reference image(s) cannot be used:\n  " + "\n  ".join(problems))
    return faces


def evaluate_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, analyzer: FaceAnalyzer,
                      aesthetic=None, progress: bool = True) -> dict:
    """Evaluate every sample; write ``out_dir/results.jsonl`` and ``out_dir/summary.md``; return the summary.

    aesthetic: an :class:`idglow_core.aesthetic.AestheticScorer` or None (the Aes columns are then left out).
    """
    samples = read_manifest(manifest)
    ref_faces = _embed_references(samples, analyzer, progress)
    results, truth_faces = [], {}  # truth_faces: ground-truth embeddings, one detection per file
    for s in tqdm(samples, desc="evaluate", unit="img", disable=not progress):
        try:
            image = load_image(s.image)
        except ImageReadError as exc:
            raise ManifestError(f"line {s.line}: {exc}") from exc
        gen_faces = analyzer.analyze(image)
        ref = np.stack([ref_faces[r].embedding for r in s.refs])
        gen = np.stack([f.embedding for f in gen_faces]) if gen_faces else np.zeros((0, ref.shape[1]))
        match = match_identities(ref, gen)
        rec = {"line": s.line, "image": str(s.image), "refs": [str(r) for r in s.refs], "task": s.task,
               "prompt_mode": s.prompt_mode, "method": s.method, "prompt": s.prompt,
               "faces": [[round(float(v), 1) for v in f.bbox] for f in gen_faces], **match.to_dict()}
        if isinstance(s.extra.get(GROUND_TRUTH_KEY), str):
            rec.update(ground_truth_record(analyzer, s.extra[GROUND_TRUTH_KEY], Path(manifest).parent, ref, gen,
                                           match.assignment, s.line, truth_faces))
        if aesthetic is not None:
            rec["aesthetic"] = float(aesthetic.score([image])[0])
        rec.update({k: v for k, v in s.extra.items() if k not in rec})
        results.append(rec)
    summary = summarise(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(results, out / "results.jsonl")
    tmp = out / ".summary.md.tmp"
    tmp.write_text(format_tables(summary), encoding="utf-8")
    os.replace(tmp, out / "summary.md")
    log.info("evaluated %d samples; results in %s", len(results), out)
    return summary


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(results: list[dict]) -> dict:
    """``{task: {method: {prompt_mode: {"fs": strict mean, "fs_matched": ..., "aes": ..., "id_conf": ...,
    "copy_paste": ... (None when no row has a ground truth), "n": count}}}}``."""
    groups: dict = {}
    for r in results:
        groups.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(r["prompt_mode"], []).append(r)
    summary: dict = {}
    for task, methods in groups.items():
        for method, modes in methods.items():
            for mode, rows in modes.items():
                summary.setdefault(task, {}).setdefault(method, {})[mode] = {
                    "fs": _mean([x["facesim_strict"] for x in rows]),
                    "fs_matched": _mean([x["facesim_matched"] for x in rows]),
                    "aes": _mean([x["aesthetic"] for x in rows]) if all("aesthetic" in x for x in rows) else None,
                    "count_ok": _mean([float(x["count_ok"]) for x in rows]),
                    "id_conf": _mean([x.get("id_conf_mean") for x in rows]),
                    "copy_paste": (_mean([x.get("copy_paste_mean") for x in rows])
                                   if any("copy_paste_mean" in x for x in rows) else None),
                    "n": len(rows),
                }
    return summary


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_tables(summary: dict) -> str:
    """Markdown tables shaped like the paper's Tables 1-2: rows = method, columns = FS and Aes per prompt mode.

    FS is the strict FaceSim (a missing face counts 0); FS(m) averages matched pairs only."""
    parts = []
    for task in [t for t in TASKS if t in summary]:
        methods = summary[task]
        modes = [m for m in PROMPT_MODES if any(m in v for v in methods.values())]
        has_aes = any(cell.get("aes") is not None for v in methods.values() for cell in v.values())
        has_cp = any(cell.get("copy_paste") is not None for v in methods.values() for cell in v.values())
        has_idc = any(_fmt(cell.get("id_conf")) != "-" for v in methods.values() for cell in v.values())
        cols = ["FS", "FS(m)"] + (["Aes"] if has_aes else []) + (["ID-Conf"] if has_idc else [])
        cols += ["CP"] if has_cp else []
        cols += ["count ok", "n"]
        head = "| Method | " + " | ".join(f"{m.capitalize()} {c}" for m in modes for c in cols) + " |"
        sep = "|---|" + "---|" * (len(modes) * len(cols))
        rows = []
        for method, cells in methods.items():
            vals = []
            for m in modes:
                c = cells.get(m, {})
                vals += [_fmt(c.get("fs")), _fmt(c.get("fs_matched"))]
                vals += [_fmt(c.get("aes"))] if has_aes else []
                vals += ([_fmt(c.get("id_conf"))] if has_idc else []) + ([_fmt(c.get("copy_paste"))] if has_cp else [])
                vals += [_fmt(c.get("count_ok")), str(c.get("n", 0))]
            rows.append(f"| {method} | " + " | ".join(vals) + " |")
        parts.append(f"### {TASK_TITLES[task]}\n\n{head}\n{sep}\n" + "\n".join(rows) + "\n")
    note = ("FS = FaceSim, Hungarian-matched cosine averaged over all references (a missing face counts 0); "
            "FS(m) = mean over matched pairs only; ID-Conf = per reference (top1 - top2) / top1 over the generated "
            "faces; CP = MultiID-Bench copy-paste (theta(g,t) - theta(g,r)) / theta(t,r) against the ground-truth "
            "photo (+1 pasted reference, -1 ground truth); count ok = share of images with exactly one face per "
            "reference.")
    return "\n".join(parts) + "\n" + note + "\n"
