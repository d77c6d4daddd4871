"""Preference pairs for the prompt enricher's badcase-driven alignment (paper §3.2).

One JSONL line per pair: the same reference images and instruction, a ``chosen`` prompt that binds attributes
to each subject precisely and a ``rejected`` barren or ambiguous one, and the ``taxonomy`` of the ambiguity:

    {"images": ["refs/a.jpg", "refs/b.jpg"], "instruction": "a picnic in the park", "task": "group",
     "chosen": "The person from Picture 1, on the left, in a red jacket ...", "rejected": "Two people in red ...",
     "taxonomy": "attribute_leakage"}

Relative image paths are resolved from the JSONL file's folder. The whole file is validated before training,
and every problem is reported with its line number.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ManifestError
from ..jsonl import raise_problems, read_jsonl, resolve_path
from ..images import save_image_atomic
from .templates import TASKS, subject_positions

__all__ = ["TAXONOMY", "PreferencePair", "read_pairs", "write_synthetic_pairs"]

TAXONOMY = ("attribute_leakage", "lighting_inconsistency", "detail_omission")
_REQUIRED = ("images", "instruction", "chosen", "rejected", "taxonomy")


@dataclass(frozen=True)
class PreferencePair:
    """images: absolute paths of the k references (left to right); chosen/rejected: the two prompts."""

    images: tuple[Path, ...]
    instruction: str
    task: str
    chosen: str
    rejected: str
    taxonomy: str


def _parse_line(row: dict, base: Path) -> tuple[PreferencePair | None, list[str]]:
    problems = [f"missing field '{f}'" for f in _REQUIRED if f not in row]
    if problems:
        return None, problems
    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    paths = tuple(resolve_path(base, str(x)) for x in images)
    problems += [f"image not found: '{p}'" for p in paths if not p.is_file()]
    if not paths:
        problems.append("'images' is empty")
    task = row.get("task", "group")
    if task not in TASKS:
        problems.append(f"unknown task '{task}' (use {', '.join(TASKS)})")
    if row["taxonomy"] not in TAXONOMY:
        problems.append(f"unknown taxonomy '{row['taxonomy']}' (use {', '.join(TAXONOMY)})")
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str) or not row[key].strip():
            problems.append(f"'{key}' must be a non-empty string")
    if not problems and row["chosen"].strip() == row["rejected"].strip():
        problems.append("'chosen' and 'rejected' are identical, so the pair teaches nothing")
    if problems:
        return None, problems
    return PreferencePair(paths, str(row["instruction"]), task, row["chosen"].strip(), row["rejected"].strip(),
                          row["taxonomy"]), []


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Read and validate a preference-pair JSONL; raise ManifestError listing every bad line at once."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Preference-pair file not found: '{path}'. Pass a JSONL file (see "
                            f"idglow_core/prompting/pairs.py for the format).")
    pairs, errors = [], []
    for number, row in read_jsonl(path, errors):
        pair, problems = _parse_line(row, path.parent)
        errors += [f"line {number}: {p}" for p in problems]
        if pair is not None:
            pairs.append(pair)
    raise_problems(errors, f"Preference-pair file '{path}'", "relative image paths are read from its folder")
    if not pairs:
        raise ManifestError(f"'{path}' holds no preference pairs. Add one JSON object per line.")
    return pairs


_HAIR = ["short black hair", "long blond hair", "curly red hair", "a grey buzz cut", "a brown ponytail"]
_CLOTHES = ["a red jacket", "a blue dress", "a green sweater", "a white shirt", "a yellow raincoat"]
_LIGHT = ["warm late-afternoon sunlight from the left", "soft overcast daylight", "golden backlight at sunset"]
_SCENES = ["on a park bench", "at a beach picnic", "in a sunlit kitchen"]


def _synthetic_texts(k: int, taxonomy: str, rng: random.Random) -> tuple[str, str, str]:
    """(instruction, chosen, rejected) for k subjects: a precise prompt vs. a barren one of the given kind."""
    hair, clothes = rng.sample(_HAIR, k), rng.sample(_CLOTHES, k)
    light, scene = rng.choice(_LIGHT), rng.choice(_SCENES)
    subjects = "; ".join(f"the person from Picture {i + 1} stands {pos}, with {hair[i]}, wearing {clothes[i]}"
                         for i, pos in enumerate(subject_positions(k)))
    chosen = f"A photorealistic group photo {scene}: {subjects}. All faces are lit by {light}; they smile together."
    if taxonomy == "attribute_leakage":
        rejected = f"A group photo of {k} people {scene}, all with {hair[0]}, wearing {clothes[0]}."
    elif taxonomy == "lighting_inconsistency":
        rejected = f"A group photo of {k} people {scene}, one in harsh flash light, the others in cold blue shade."
    else:
        rejected = f"A group photo of {k} people."
    return f"a group photo {scene}", chosen, rejected


def write_synthetic_pairs(folder: str | os.PathLike, n: int = 8, k: int = 2, seed: int = 0,
                          size: int = 56) -> Path:
    """Write ``n`` synthetic pairs (k random-colour portraits each, ``size`` px) and ``pairs.jsonl``; return it.

    For offline smoke runs of the trainer only: the images carry no faces.
    """
    folder = Path(folder)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    lines = []
    for i in range(n):
        images = []
        for j in range(k):
            colour = np_rng.integers(0, 256, size=3)
            pixels = np.clip(colour + np_rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            images.append(save_image_atomic(pixels, folder / "images" / f"{i:04d}_{j}.png").name)
        taxonomy = TAXONOMY[i % len(TAXONOMY)]
        instruction, chosen, rejected = _synthetic_texts(k, taxonomy, rng)
        lines.append(json.dumps({"images": [f"images/{name}" for name in images], "instruction": instruction,
                                 "task": "group", "chosen": chosen, "rejected": rejected, "taxonomy": taxonomy}))
    out = folder / "pairs.jsonl"
    tmp = out.with_name(".pairs.jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
