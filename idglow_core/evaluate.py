"""Batch evaluation of generated group photos: FaceSim (Eq. 2-3) and the aesthetic score, paper-style tables.

Manifest: JSONL, one sample a line, paths relative to the manifest's folder::

    {"refs": ["a.jpg", "b.jpg"], "image": "gen/0001.png", "prompt": "...", "task": "group",
     "prompt_mode": "static", "method": "IdGlow"}

``task`` is ``group`` (Task 1) or ``age`` (Task 2); ``prompt_mode`` is ``static`` or ``dynamic``; ``method``
names the row of the table. A row may name its ground-truth image under ``target`` (the real group photo the
references were cut from): the copy-paste measure is then computed (:mod:`idglow_core.bench.copypaste`). Each distinct reference file is embedded once and each distinct generated image is
detected once, however many lines name it (optionally in ``workers`` CPU processes).

Before any work: the output folder is checked (writable; results of another manifest or other settings are not
replaced without ``overwrite``), and every problem with the manifest (bad JSON or text encoding, missing keys,
missing files, unreadable or oversized generated images, references without a face) is reported at once, with
line numbers. Rows are appended to ``results.jsonl`` as they are computed, so an interrupted run keeps its
finished rows and the same command resumes it (see :mod:`idglow_core.eval_store`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .bench.copypaste import GROUND_TRUTH_KEY, ground_truth_record
from .errors import ImageReadError, ManifestError, NoFaceError
from .eval_store import ResultStore, check_output_dir, file_signature, manifest_sha256
from .faces.base import Face, FaceAnalyzer, pick_face
from .faces.batch import FileAnalyzer
from .facesim import match_identities
from .images import load_image
from .jsonl import file_problem, raise_problems, read_jsonl, resolve_path

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
    if isinstance(refs, str):
        bad.append(f"'refs' must be a list of file paths, got one string; write [{json.dumps(refs)}]")
    elif not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
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
    problem = file_problem(path, "manifest")
    if problem:
        raise ManifestError(f"Evaluation {problem}. Pass a JSONL file with one sample per line.")
    problems: list[str] = []
    samples = []
    for lineno, rec in read_jsonl(path, problems):
        sample = _parse(path.parent, lineno, rec, problems)
        if sample is not None:
            problems += [f"line {lineno}: {p}" for p in map(file_problem, (*sample.refs, sample.image)) if p]
            samples.append(sample)
    raise_problems(problems, f"Manifest '{path}'")
    if not samples:
        raise ManifestError(f"Manifest '{path}' has no samples. Add one JSON object per line, e.g. "
                            '{"refs": ["a.jpg", "b.jpg"], "image": "gen.png", "task": "group"}.')
    return samples


def _first_lines(samples: list[Sample], paths) -> dict[Path, list[int]]:
    """Each distinct file -> the manifest lines that name it (in first-seen order)."""
    lines: dict[Path, list[int]] = {}
    for s in samples:
        for p in paths(s):
            lines.setdefault(p, []).append(s.line)
    return lines


def _where(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:5])) + (f" (and {len(lines) - 5} more)" if len(lines) > 5 else "")
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}"


def _check_inputs(samples: list[Sample], batch: FileAnalyzer, progress: bool) -> dict[Path, Face]:
    """Decode every distinct generated image and embed every distinct reference; raise one
    :class:`ManifestError` listing every unreadable image and faceless reference (with its lines)."""
    images = _first_lines(samples, lambda s: (s.image,))
    refs = _first_lines(samples, lambda s: s.refs)
    problems = []
    checks = batch.check(images)
    for path, exc in tqdm(checks, total=len(images), desc="check images", unit="img", leave=False,
                          disable=not progress):
        if exc is not None:
            problems.append(f"{_where(images[path])}: {exc}")
    faces = {}
    for ref, found in tqdm(batch.analyze(refs), total=len(refs), desc="references", unit="img", leave=False,
                           disable=not progress):
        try:
            if isinstance(found, ImageReadError):
                raise found
            faces[ref] = pick_face(found, label=f"reference '{ref.name}'")
        except (NoFaceError, ImageReadError) as exc:
            problems.append(f"{_where(refs[ref])}: {ref}: {exc}")
    raise_problems(problems, "Evaluation inputs", hint="nothing was evaluated yet")
    return faces


def score_sample(s: Sample, gen_faces: list[Face], ref_faces: dict[Path, Face], image_sig: str,
                 aesthetic: float | None = None, ground_truth: Callable | None = None) -> dict:
    """One results row: the sample's fields, the faces found and every metric of one generated image.

    ground_truth: ``(sample, ref, gen, assignment) -> dict`` of the copy-paste fields, for rows naming a
    ground-truth image. New per-row metrics go here (one ``rec[...] = ...`` each) and into :func:`summarise`."""
    ref = np.stack([ref_faces[r].embedding for r in s.refs])
    gen = np.stack([f.embedding for f in gen_faces]) if gen_faces else np.zeros((0, ref.shape[1]))
    match = match_identities(ref, gen)
    rec = {"line": s.line, "image": str(s.image), "refs": [str(r) for r in s.refs], "task": s.task,
           "prompt_mode": s.prompt_mode, "method": s.method, "prompt": s.prompt,
           "faces": [[round(float(v), 1) for v in f.bbox] for f in gen_faces], **match.to_dict()}
    if ground_truth is not None and isinstance(s.extra.get(GROUND_TRUTH_KEY), str):
        rec.update(ground_truth(s, ref, gen, match.assignment))
    if aesthetic is not None:
        rec["aesthetic"] = float(aesthetic)
    rec["image_sig"] = image_sig
    rec.update({k: v for k, v in s.extra.items() if k not in rec})
    return rec


def _pending(samples: list[Sample], done: dict[int, dict]) -> list[Sample]:
    """Samples without a finished row, or whose generated image changed since its row was computed."""
    out = []
    for s in samples:
        row = done.get(s.line)
        if row is None or row.get("image") != str(s.image) or row.get("image_sig") != file_signature(s.image):
            done.pop(s.line, None)
            out.append(s)
    return out


def _evaluate_rows(todo: list[Sample], batch: FileAnalyzer, ref_faces: dict[Path, Face], store: ResultStore,
                   aesthetic, progress: bool, ground_truth: Callable | None = None) -> None:
    """Analyse each distinct generated image once and append one row per manifest line that names it."""
    by_image = _first_lines(todo, lambda s: (s.image,))
    line_sample = {s.line: s for s in todo}
    with tqdm(total=len(todo), desc="evaluate", unit="sample", disable=not progress) as bar:
        for path, faces in batch.analyze(by_image):
            if isinstance(faces, ImageReadError):  # changed since the check
                raise ManifestError(f"{_where(by_image[path])}: {faces}")
            aes = float(aesthetic.score([load_image(path)])[0]) if aesthetic is not None else None
            sig = file_signature(path)
            for line in by_image[path]:
                store.append(score_sample(line_sample[line], faces, ref_faces, sig, aes, ground_truth))
                bar.update(1)


def evaluate_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, analyzer: FaceAnalyzer,
                      aesthetic=None, progress: bool = True, overwrite: bool = False, workers: int = 1) -> dict:
    """Evaluate every sample; append rows to ``out_dir/results.jsonl``, write ``out_dir/summary.md``; return the
    summary.

    aesthetic: an :class:`idglow_core.aesthetic.AestheticScorer` or None (the Aes columns are then left out).
    Resumes a run into the same folder with the same manifest and settings; refuses (:class:`OutputError`) to
    replace rows of another one unless ``overwrite``. workers: face-analysis processes (CPU backends).
    """
    check_output_dir(out_dir)
    samples = read_manifest(manifest)
    run = {"manifest_sha256": manifest_sha256(manifest), "backend": analyzer.name,
           "embedding_dim": int(analyzer.embedding_dim), "aesthetic": aesthetic is not None}
    store = ResultStore.prepare(out_dir, run, overwrite=overwrite)
    todo = _pending(samples, store.done)
    if len(todo) < len(samples):
        log.info("resuming: %d of %d rows already done in %s", len(samples) - len(todo), len(samples), store.out)
    with FileAnalyzer(analyzer, workers) as batch:
        ref_faces = _check_inputs(todo, batch, progress) if todo else {}
        store.start()
        truth_faces: dict = {}  # ground-truth embeddings: one detection per file

        def ground_truth(s: Sample, ref, gen, assignment) -> dict:
            return ground_truth_record(analyzer, s.extra[GROUND_TRUTH_KEY], Path(manifest).parent, ref, gen,
                                       assignment, s.line, truth_faces)

        try:
            _evaluate_rows(todo, batch, ref_faces, store, aesthetic, progress, ground_truth)
        except KeyboardInterrupt:
            log.warning("interrupted: %d of %d rows are kept in %s; rerun the same command to resume",
                        len(store.done), len(samples), store.out / "results.jsonl")
            raise
        finally:
            store.close()
    results = store.rows()
    summary = summarise(results)
    store.finish(format_tables(summary))
    log.info("evaluated %d samples (%d new); results in %s", len(results), len(todo), store.out)
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


def _cell(text: str) -> str:
    """A table cell that cannot break the Markdown table: newlines become spaces, ``|`` is escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


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
            rows.append(f"| {_cell(method)} | " + " | ".join(vals) + " |")
        parts.append(f"### {TASK_TITLES[task]}\n\n{head}\n{sep}\n" + "\n".join(rows) + "\n")
    note = ("FS = FaceSim, Hungarian-matched cosine averaged over all references (a missing face counts 0); "
            "FS(m) = mean over matched pairs only; ID-Conf = per reference (top1 - top2) / top1 over the generated "
            "faces; CP = MultiID-Bench copy-paste (theta(g,t) - theta(g,r)) / theta(t,r) against the ground-truth "
            "photo (+1 pasted reference, -1 ground truth); count ok = share of images with exactly one face per "
            "reference.")
    return "\n".join(parts) + "\n" + note + "\n"
