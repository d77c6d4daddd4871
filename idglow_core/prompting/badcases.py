"""Mine badcases for the prompt enricher's preference alignment (paper §3.2): the worst generations by category.

Input: a JSONL with one generation per line and its scores, e.g. the output of batch evaluation:

    {"id": "0007", "prompt": "...", "generation": "out/0007.png", "facesim": 0.41, "aesthetic": 5.2,
     "task": "group", "k": 2, "category": "attribute_leakage"}          # id, generation, task, k, category optional

Each row gets a badness score: the mean of its percentile ranks in FaceSim and in aesthetic within the file
(0 = worst on both, 1 = best). Rows without a ``category`` get a suggested one from their prompt (a subject not
named -> detail_omission, no light described -> lighting_inconsistency, attributes not bound to a picture ->
attribute_leakage, else prompt_ok). Output: the worst ``top`` per category, as markdown or JSON, for review.

    python -m idglow_core.prompting.badcases scores.jsonl --top 10 --out badcases.md
    python train/mine_badcases.py scores.jsonl --format json --out badcases.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import IdGlowError, ManifestError
from .enricher import check_prompt
from .pairs import TAXONOMY

log = logging.getLogger("idglow")

__all__ = ["Badcase", "read_scores", "percentile_ranks", "suggest_category", "mine_badcases", "to_markdown", "main"]

_ALIASES = {"facesim": ("facesim", "face_sim", "fs"), "aesthetic": ("aesthetic", "aesthetic_score", "aes")}
_LIGHT = re.compile(r"\b(light|lit|lighting|sun|sunlight|sunset|shade|shadow|lamp|glow|illuminat\w*|backlit)\b", re.I)
_BOUND = r"(picture|person|subject)\s*{n}\b[^.;]{{0,120}}\b(wear\w*|with|in an? |hair|dress\w*|shirt|jacket)"


@dataclass
class Badcase:
    """One scored generation; score = mean percentile rank of facesim and aesthetic (0 = worst)."""

    id: str
    prompt: str
    facesim: float
    aesthetic: float
    category: str
    suggested: bool
    generation: str = ""
    score: float = 0.0


def _number(row: dict, key: str, line: int) -> float:
    for alias in _ALIASES[key]:
        if alias in row:
            try:
                return float(row[alias])
            except (TypeError, ValueError):
                raise ManifestError(f"line {line}: '{alias}' is {row[alias]!r}, not a number. Fix the score.") from None
    raise ManifestError(f"line {line}: no '{key}' score (accepted names: {', '.join(_ALIASES[key])}). Score the "
                        f"generations first (python -m idglow_core evaluate).")


def suggest_category(prompt: str, task: str = "group", k: int | None = None) -> str:
    """A first guess of the taxonomy from the prompt text alone (a reviewer confirms or changes it)."""
    if k and any(i.startswith("does not mention") for i in check_prompt(prompt, task, k, min_words=1)):
        return "detail_omission"
    if not _LIGHT.search(prompt):
        return "lighting_inconsistency"
    if k and not all(re.search(_BOUND.format(n=n), prompt, re.I) for n in range(1, k + 1)):
        return "attribute_leakage"
    return "prompt_ok"


def read_scores(path: str | os.PathLike) -> list[Badcase]:
    """Read a scored-generation JSONL (see the module docstring); ManifestError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Scores file not found: '{path}'. Pass the JSONL written by batch evaluation.")
    cases = []
    for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"line {line} of '{path}' is not valid JSON ({exc.msg}).") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ManifestError(f"line {line} of '{path}' needs a string 'prompt' field.")
        category, suggested = row.get("category"), False
        if category is None:
            category, suggested = suggest_category(row["prompt"], row.get("task", "group"), row.get("k")), True
        cases.append(Badcase(str(row.get("id", line)), row["prompt"], _number(row, "facesim", line),
                             _number(row, "aesthetic", line), str(category), suggested, str(row.get("generation", ""))))
    if not cases:
        raise ManifestError(f"'{path}' holds no scored generations.")
    return cases


def percentile_ranks(values: list[float]) -> list[float]:
    """Rank of each value scaled to [0, 1] (0 = smallest); ties share their mean rank; one value -> 0.5."""
    if len(values) == 1:
        return [0.5]
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 / (len(values) - 1)
        i = j + 1
    return ranks


def mine_badcases(cases: list[Badcase], top: int = 10) -> dict[str, list[Badcase]]:
    """Score every case and return the ``top`` worst per category, worst first (categories sorted)."""
    fs, aes = percentile_ranks([c.facesim for c in cases]), percentile_ranks([c.aesthetic for c in cases])
    for case, a, b in zip(cases, fs, aes):
        case.score = (a + b) / 2
    groups: dict[str, list[Badcase]] = {}
    for case in sorted(cases, key=lambda c: (c.score, c.facesim)):
        groups.setdefault(case.category, []).append(case)
    return {name: groups[name][:top] for name in sorted(groups)}


def to_markdown(groups: dict[str, list[Badcase]]) -> str:
    """A review sheet: one table per category (score, FaceSim, aesthetic, prompt, generation)."""
    lines = ["# Prompt-enricher badcases", "",
             f"Score = mean percentile rank of FaceSim and aesthetic (0 = worst). Taxonomy: {', '.join(TAXONOMY)}; "
             "a * marks a category suggested from the prompt text.", ""]
    for name, cases in groups.items():
        lines += [f"## {name} ({len(cases)})", "", "| id | score | FaceSim | aesthetic | prompt | generation |",
                  "|---|---|---|---|---|---|"]
        for c in cases:
            prompt = c.prompt.replace("|", "/").replace("\n", " ")
            prompt = prompt if len(prompt) <= 160 else prompt[:157] + "..."
            lines.append(f"| {c.id}{'*' if c.suggested else ''} | {c.score:.3f} | {c.facesim:.3f} | "
                         f"{c.aesthetic:.2f} | {prompt} | {c.generation} |")
        lines.append("")
    return "\n".join(lines)


def _write_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """CLI: mine the worst generations per category from a scores JSONL."""
    parser = argparse.ArgumentParser(description="List the worst generations per badcase category for review.")
    parser.add_argument("scores", help="JSONL: prompt, facesim, aesthetic (+ id, generation, task, k, category)")
    parser.add_argument("--top", type=int, default=10, help="how many per category (default 10)")
    parser.add_argument("--format", choices=("md", "json"), default="md", help="output format (default md)")
    parser.add_argument("--out", help="output file (default: standard output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        groups = mine_badcases(read_scores(args.scores), top=max(1, args.top))
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = to_markdown(groups) if args.format == "md" else json.dumps(
        {k: [asdict(c) for c in v] for k, v in groups.items()}, indent=2)
    if args.out:
        _write_atomic(text, Path(args.out))
        log.info("Wrote %d categories to %s", len(groups), args.out)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
