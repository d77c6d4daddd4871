"""The input of pair building: one JSONL line per group ``(refs, prompt)``, paths relative to the file's folder::

    {"id": "g1", "refs": ["refs/a.jpg", "refs/b.jpg"], "prompt": "...", "task": "group",
     "anchors": ["real/ab_beach.jpg"], "generated": ["gen/ab_0.png", "gen/ab_1.png"]}

``anchors`` are authentic group photos of the same people (positive anchors); ``generated`` are existing
generations (more come from the generator, one per configured seed). ``id`` (letters, digits, ``-``, ``_``;
default ``g<line>``) names the group's image folder. An empty ``prompt`` becomes the static template of
``task``. Every problem is reported at once, with line numbers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError
from ..jsonl import raise_problems, read_jsonl, resolve_path
from ..prompting.templates import TASKS, static_prompt

__all__ = ["Group", "read_groups"]

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Group:
    """One validated line: absolute paths, the prompt to score ``phi_sem`` against, the task."""

    line: int
    id: str
    refs: tuple[Path, ...]
    prompt: str
    task: str
    anchors: tuple[Path, ...] = ()
    generated: tuple[Path, ...] = ()


def _paths(value, key: str, base: Path, bad: list[str], required: bool) -> tuple[Path, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (required and not value):
        bad.append(f"'{key}' must be a {'non-empty ' if required else ''}list of image paths")
        return ()
    paths = tuple(resolve_path(base, v) for v in value)
    bad += [f"{key}: file not found: {p}" for p in paths if not p.is_file()]
    return paths


def _parse(rec: dict, lineno: int, base: Path, problems: list[str]) -> Group | None:
    bad: list[str] = []
    unknown = sorted(set(rec) - {"id", "refs", "prompt", "task", "anchors", "generated"})
    if unknown:
        bad.append(f"unknown key(s) {unknown}")
    gid = str(rec.get("id", f"g{lineno:04d}"))
    if not _ID.match(gid):
        bad.append(f"'id' {gid!r} must be 1-64 letters, digits, '-' or '_' (it names a folder)")
    task = rec.get("task", "group")
    if task not in TASKS:
        bad.append(f"'task' must be one of {TASKS}, got {task!r}")
    prompt = rec.get("prompt", "")
    if not isinstance(prompt, str):
        bad.append("'prompt' must be a string")
    refs = _paths(rec.get("refs"), "refs", base, bad, required=True)
    anchors = _paths(rec.get("anchors"), "anchors", base, bad, required=False)
    generated = _paths(rec.get("generated"), "generated", base, bad, required=False)
    if bad:
        problems.append(f"line {lineno}: " + "; ".join(bad))
        return None
    prompt = prompt.strip() or static_prompt(task, len(refs))
    return Group(lineno, gid, refs, prompt, task, anchors, generated)


def read_groups(path: str | os.PathLike) -> list[Group]:
    """Parse and check a groups file; raise :class:`ManifestError` listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Groups file '{path}' does not exist. Pass a JSONL file with one group per line, e.g. "
                            '{"refs": ["a.jpg", "b.jpg"], "anchors": ["ab.jpg"], "prompt": "..."}.')
    problems: list[str] = []
    groups = [g for lineno, rec in read_jsonl(path, problems)
              if (g := _parse(rec, lineno, path.parent, problems)) is not None]
    seen: dict[str, int] = {}
    for g in groups:
        if g.id in seen:
            problems.append(f"line {g.line}: id '{g.id}' already used on line {seen[g.id]}; ids must be unique")
        seen.setdefault(g.id, g.line)
    raise_problems(problems, f"Groups file '{path}'", "paths are relative to the groups file's folder")
    if not groups:
        raise ManifestError(f"Groups file '{path}' has no groups. Add one JSON object per line.")
    return groups
