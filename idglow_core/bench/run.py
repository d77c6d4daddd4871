"""``bench run``: generate every row of ``bench.jsonl`` with one method; resumable and sharded.

A method is any object with ``generate(row, out_path)`` that writes one image to ``out_path`` (atomically):
:class:`idglow_core.bench.pipeline_method.PipelineMethod` (IdGlowPipeline, adapter optional) or
:class:`idglow_core.bench.comfy.ComfyMethod` (any ComfyUI workflow over HTTP). It may raise
:class:`RowSkipped` for rows it cannot take (e.g. no workflow for that k): they are counted with the reason.

Images go to ``<bench>/runs/<method>/images/<row id>.png``. A row whose image exists is skipped, so a killed
run resumes where it stopped. Rank ``r`` of ``w`` processes (``accelerate launch`` sets ``RANK`` and
``WORLD_SIZE``) takes rows ``r, r + w, ...``. Afterwards :func:`write_manifests` writes
``runs/<method>/manifest.jsonl`` (the finished rows, in :mod:`idglow_core.evaluate`'s format) and
``generated.jsonl`` next to ``bench.jsonl`` (every method's finished rows: one table row per method).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from ..errors import IdGlowError, InputError, ManifestError
from ..jsonl import raise_problems, read_jsonl, resolve_path, write_jsonl_atomic

__all__ = ["BenchRow", "Method", "RowSkipped", "RunResult", "read_bench", "run_bench", "write_manifests",
           "method_dir", "shard"]

log = logging.getLogger("idglow")
_REQUIRED = ("id", "refs", "task", "prompt_mode", "prompt", "seed")
_PATH_KEYS = ("target",)  # optional ground-truth image, carried into the evaluation manifest


class RowSkipped(IdGlowError):
    """A method cannot generate this row (the reason is counted, the run goes on)."""


@dataclass(frozen=True)
class BenchRow:
    """One generation: refs are absolute paths, left to right; ``record`` is the raw bench line."""

    id: str
    refs: tuple[Path, ...]
    task: str
    prompt_mode: str
    prompt: str
    seed: int
    record: dict = field(default_factory=dict)


class Method(Protocol):
    def generate(self, row: BenchRow, out_path: Path) -> None:
        """Write the image of ``row`` to ``out_path`` (PNG, atomically)."""
        ...


@dataclass
class RunResult:
    """done: generated now; existing: skipped because the image was there; skipped/failed: ``{id: reason}``."""

    done: int = 0
    existing: int = 0
    skipped: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)


def read_bench(path: str | os.PathLike) -> list[BenchRow]:
    """Rows of ``bench.jsonl``; every problem (missing keys, missing refs, repeated ids) reported at once."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Bench file '{path}' does not exist. Write it with `python -m idglow_core bench build`.")
    problems: list[str] = []
    rows = []
    for lineno, rec in read_jsonl(path, problems):
        missing = [k for k in _REQUIRED if k not in rec]
        if missing or not isinstance(rec.get("refs"), list) or not rec.get("refs"):
            problems.append(f"line {lineno}: missing {missing or ['refs']}")
            continue
        refs = tuple(resolve_path(path.parent, r) for r in rec["refs"])
        problems += [f"line {lineno}: reference not found: {r}" for r in refs if not r.is_file()]
        rows.append(BenchRow(str(rec["id"]), refs, rec["task"], rec["prompt_mode"], str(rec["prompt"]),
                             int(rec["seed"]), rec))
    ids = [r.id for r in rows]
    problems += [f"id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
    raise_problems(problems, f"Bench file '{path}'", "rebuild it with `bench build`")
    if not rows:
        raise ManifestError(f"Bench file '{path}' has no rows.")
    return rows


def method_dir(bench_path: str | os.PathLike, method: str) -> Path:
    """``<bench folder>/runs/<method name as a file name>``."""
    if not method or not method.strip():
        raise InputError("The method needs a name (--method NAME); it labels its row in the tables.")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", method.strip()).strip("._") or "method"
    return Path(bench_path).parent / "runs" / slug


def image_path(bench_path: str | os.PathLike, method: str, row: BenchRow) -> Path:
    return method_dir(bench_path, method) / "images" / f"{row.id}.png"


def shard(rows: list, rank: int, world: int) -> list:
    """Rank ``rank`` of ``world`` takes rows ``rank, rank + world, ...``."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} of world size {world} is impossible; rank must be in 0..world-1.")
    return rows[rank::world]


def run_bench(bench_path: str | os.PathLike, method: Method, method_name: str, rank: int = 0, world: int = 1,
              progress: bool = True) -> RunResult:
    """Generate this rank's rows whose image does not exist yet. Returns the counts."""
    rows = shard(read_bench(bench_path), rank, world)
    result = RunResult()
    for row in tqdm(rows, desc=f"{method_name} rank {rank}", unit="img", disable=not progress):
        out = image_path(bench_path, method_name, row)
        if out.is_file():
            result.existing += 1
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            method.generate(row, out)
        except RowSkipped as exc:
            result.skipped[row.id] = str(exc)
            continue
        except IdGlowError as exc:  # one bad row (no face, a node error) must not stop the benchmark
            log.warning("row %s failed: %s", row.id, exc)
            result.failed[row.id] = f"{type(exc).__name__}: {exc}"
            continue
        if not out.is_file():
            raise InputError(f"The method returned without writing {out} for row {row.id}.")
        result.done += 1
    log.info("%s rank %d/%d: %d generated, %d already there, %d skipped, %d failed", method_name, rank, world,
             result.done, result.existing, len(result.skipped), len(result.failed))
    return result


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def write_manifests(bench_path: str | os.PathLike, method_name: str) -> tuple[Path, int]:
    """Write ``runs/<method>/manifest.jsonl`` (rows whose image exists) and refresh ``generated.jsonl`` (all
    methods). Returns the method manifest's path and its row count."""
    bench_path = Path(bench_path)
    folder = method_dir(bench_path, method_name)
    records = []
    for row in read_bench(bench_path):
        img = image_path(bench_path, method_name, row)
        if not img.is_file():
            continue
        rec = {k: v for k, v in row.record.items() if k not in ("refs", *_PATH_KEYS)}
        rec.update(refs=[_rel(r, folder) for r in row.refs], image=_rel(img, folder), method=method_name)
        for key in _PATH_KEYS:
            if isinstance(row.record.get(key), str):
                rec[key] = _rel(resolve_path(bench_path.parent, row.record[key]), folder)
        records.append(rec)
    write_jsonl_atomic(records, folder / "manifest.jsonl")
    union = []
    for manifest in sorted((bench_path.parent / "runs").glob("*/manifest.jsonl")):
        for _, rec in read_jsonl(manifest, []):
            for key in ("image", "refs", *_PATH_KEYS):
                if isinstance(rec.get(key), str):
                    rec[key] = _rel(manifest.parent / rec[key], bench_path.parent)
                elif key == "refs":
                    rec[key] = [_rel(manifest.parent / r, bench_path.parent) for r in rec[key]]
            union.append(rec)
    write_jsonl_atomic(union, bench_path.parent / "generated.jsonl")
    return folder / "manifest.jsonl", len(records)
