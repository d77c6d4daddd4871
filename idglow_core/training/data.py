"""Training data: the JSONL manifest, its validation, and a small synthetic set for smoke runs.

One line per sample, paths relative to the manifest's folder::

    {"target": "group.jpg", "refs": ["a.jpg", "b.jpg"], "prompt": "...", "task": "group"}

:func:`read_manifest` checks every line before training starts: malformed JSON, missing keys, missing or
unreadable images, and references without a detectable face are all listed with their line numbers in one
:class:`ManifestError`, so a bad dataset fails in seconds instead of hours into a run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageReadError, ManifestError
from ..faces.base import Face, FaceAnalyzer, pick_face
from ..images import load_image
from ..jsonl import raise_problems, read_jsonl, resolve_path
from ..schedules import TASK_SCHEDULES

__all__ = ["Sample", "TaskTagged", "with_tasks", "read_manifest", "read_validated", "check_references", "fit_area",
           "write_synthetic_manifest"]

log = logging.getLogger("idglow")


@dataclass
class Sample:
    """One validated manifest line. ``ref_faces[j]`` is the chosen face of ``refs[j]`` (largest)."""

    line: int
    target: Path
    refs: list[Path]
    prompt: str
    task: str
    ref_faces: list[Face] = field(default_factory=list)


class TaskTagged(Sequence):
    """Encoded samples with each one's manifest ``task``: item ``i`` is ``{**items[i], "task": tasks[i]}``,
    built on access (``items`` may be a lazy sequence). Slices give lists."""

    def __init__(self, items: Sequence[dict[str, Any]], tasks: Sequence[str]):
        if len(items) != len(tasks):
            raise ManifestError(f"{len(items)} encoded samples but {len(tasks)} tasks: encode every manifest line.")
        self.items, self.tasks = items, list(tasks)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {**self.items[i], "task": self.tasks[i]}


def with_tasks(collate: Callable[[list], dict[str, Any]]) -> Callable[[list], dict[str, Any]]:
    """``collate`` plus ``batch["task"]``: the list of the items' tasks (each sample gets its own Omega)."""
    def collate_with_tasks(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        batch["task"] = [it["task"] for it in items]
        return batch
    return collate_with_tasks


def check_common_fields(item: dict, image_keys: tuple[str, ...]) -> list[str]:
    """What is wrong with the fields every training manifest shares: ``image_keys`` (one image path each),
    ``refs``, ``prompt`` and ``task``."""
    bad = [f"'{key}' must be an image path" for key in image_keys
           if not isinstance(item.get(key), str) or not item.get(key)]
    refs, prompt, task = item.get("refs"), item.get("prompt", ""), item.get("task", "group")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        bad.append("'refs' must be a non-empty list of image paths")
    if not isinstance(prompt, str):
        bad.append("'prompt' must be a string")
    if task not in TASK_SCHEDULES:
        bad.append(f"'task' must be one of {sorted(TASK_SCHEDULES)}, got {task!r}")
    return bad


def _parse_line(item: dict, lineno: int, root: Path, problems: list[str]) -> Sample | None:
    target, refs, prompt = item.get("target"), item.get("refs"), item.get("prompt", "")
    task = item.get("task", "group")
    bad = check_common_fields(item, ("target",))
    if bad:
        problems.append(f"line {lineno}: " + "; ".join(bad))
        return None
    return Sample(line=lineno, target=resolve_path(root, target), refs=[resolve_path(root, r) for r in refs],
                  prompt=prompt, task=task)


def check_references(line: int, refs: Sequence[Path], analyzer: FaceAnalyzer | None,
                     problems: list[str]) -> list[Face]:
    """Read every reference of manifest line ``line``; with ``analyzer`` each must hold a face. Problems are
    appended to ``problems``; returns the chosen (largest) face of each reference that has one."""
    faces_out = []
    for j, ref in enumerate(refs):
        try:
            image = load_image(ref)
        except ImageReadError as exc:
            problems.append(f"line {line}: reference {j + 1} {exc}")
            continue
        if analyzer is None:
            continue
        faces = analyzer.analyze(image)
        if not faces:
            problems.append(f"line {line}: no face found in reference {j + 1} '{ref}'")
        else:
            faces_out.append(pick_face(faces))
    return faces_out


def _check_images(sample: Sample, analyzer: FaceAnalyzer | None, problems: list[str]) -> None:
    try:
        load_image(sample.target)
    except ImageReadError as exc:
        problems.append(f"line {sample.line}: target {exc}")
    sample.ref_faces.extend(check_references(sample.line, sample.refs, analyzer, problems))


def read_manifest(path: str | Path, analyzer: FaceAnalyzer | None = None, *,
                  max_ids: int | None = None) -> list[Sample]:
    """Parse and validate a training manifest; return one :class:`Sample` per line (blank lines skipped).

    With ``analyzer``, every reference must contain a face (the largest is kept in ``Sample.ref_faces``).
    ``max_ids`` caps the number of references per sample. Raises :class:`ManifestError` listing every
    problem with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Training manifest not found: '{path}'. Set data.manifest to a JSONL file "
                            f"(one {{\"target\", \"refs\", \"prompt\", \"task\"}} object per line).")
    samples = read_validated(path, _parse_line, lambda s, problems: _check_images(s, analyzer, problems),
                             what="Training manifest", noun="samples", max_ids=max_ids)
    log.info("manifest %s: %d samples validated", path, len(samples))
    return samples


def read_validated(path: Path, parse: Callable, check: Callable, *, what: str, noun: str,
                   max_ids: int | None = None) -> list:
    """The loop every training manifest shares: parse each JSONL object (``parse(item, line, folder,
    problems)``), cap the references at ``max_ids``, ``check(parsed, problems)`` its files, and raise one
    :class:`ManifestError` listing every problem with its line number."""
    problems: list[str] = []
    items = []
    for lineno, raw in read_jsonl(path, problems):
        item = parse(raw, lineno, path.parent, problems)
        if item is None:
            continue
        if max_ids is not None and len(item.refs) > max_ids:
            problems.append(f"line {lineno}: {len(item.refs)} references, but the adapter takes at most "
                            f"{max_ids} (model.max_ids)")
        check(item, problems)
        items.append(item)
    if not items and not problems:
        problems.append(f"the manifest has no {noun}")
    raise_problems(problems, f"{what} '{path}'")
    return items


def fit_area(image: np.ndarray, area: int, multiple: int = 32) -> np.ndarray:
    """Resize ``[H, W, 3]`` uint8 to about ``area`` pixels, keeping the aspect ratio, each side a multiple of
    ``multiple`` (as QwenImageEditPlusPipeline sizes its images). Returns ``[H', W', 3]`` uint8."""
    h, w = image.shape[:2]
    scale = (area / float(h * w)) ** 0.5
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))


def write_synthetic_manifest(folder: str | Path, n: int, photos: Sequence[str | Path], *, task: str = "group",
                             size: int = 128) -> Path:
    """Write ``n`` synthetic group samples for smoke runs and return the manifest path.

    Sample i uses two of the given portrait ``photos`` as references (copied at full size, so the face detector
    finds them); its target is the two portraits side by side (a crude "group photo" of the same two people),
    each ``size`` x ``size``. The prompt is the static
    template of ``task``. Deterministic: the same arguments give the same files.
    """
    from ..prompting.templates import static_prompt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(photos) < 2:
        raise ManifestError(f"Synthetic data needs at least 2 portrait photos, got {len(photos)}.")
    portraits = []
    for i, p in enumerate(photos):
        img = Image.fromarray(load_image(p))
        img.save(folder / f"ref_{i}.png")
        portraits.append(img.resize((size, size), Image.Resampling.BICUBIC))
    lines = []
    for s in range(n):
        a, b = s % len(photos), (s + 1) % len(photos)
        group = Image.new("RGB", (2 * size, size))
        group.paste(portraits[a], (0, 0))
        group.paste(portraits[b], (size, 0))
        group.save(folder / f"group_{s}.png")
        lines.append(json.dumps({"target": f"group_{s}.png", "refs": [f"ref_{a}.png", f"ref_{b}.png"],
                                 "prompt": static_prompt(task, 2), "task": task}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
