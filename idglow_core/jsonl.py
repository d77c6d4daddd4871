"""Reading the JSONL manifests every part of IdGlow takes (evaluation, SFT, DPO, pair building, prompt pairs).

One rule everywhere: all problems of a file are collected, each with its line number, and reported at once
(:func:`raise_problems`) before any work starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import ManifestError

__all__ = ["read_jsonl", "resolve_path", "file_problem", "raise_problems", "write_jsonl_atomic"]

MAX_LISTED = 50


def read_jsonl(path: str | os.PathLike, problems: list[str]) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of ``path``.

    A line that is not UTF-8 text, not valid JSON, or not a JSON object, is skipped and recorded in ``problems``
    as ``"line N: ..."`` (a UTF-8 byte-order mark at the start is accepted). The caller checks that the file
    exists (its message names what the file is for).
    """
    records = []
    with open(path, "rb") as fh:
        for lineno, data in enumerate(fh, start=1):
            try:
                raw = data.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"line {lineno}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8")
                continue
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"line {lineno}: expected a JSON object, got {type(rec).__name__}")
                continue
            records.append((lineno, rec))
    return records


def resolve_path(base: Path, value: str) -> Path:
    """A manifest path: absolute as given (``~`` expanded), else relative to the manifest's folder ``base``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def file_problem(path: Path, what: str = "file") -> str | None:
    """Why ``path`` cannot be read as a file: ``"<what> not found: ..."``, ``"... is a folder, not a file"``,
    or None when it is a file."""
    if path.is_file():
        return None
    if path.is_dir():
        return f"'{path}' is a folder, not a file"
    return f"{what} not found: {path}"


def raise_problems(problems: list[str], what: str, hint: str = "paths are relative to the manifest's folder") -> None:
    """Raise :class:`ManifestError` listing ``problems`` (at most :data:`MAX_LISTED`) when there are any."""
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ManifestError(f"{what} has {len(problems)} problem(s); fix them and rerun ({hint}):\n  {shown}{more}")


def write_jsonl_atomic(records: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, written through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
