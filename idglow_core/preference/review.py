"""Stage 2 of §3.4, human verification: a static review page, a decisions file, the final DPO manifest.

1. :func:`write_review_page` turns ``pairs.jsonl`` into one self-contained HTML file (no external JS/CSS;
   images linked by relative paths, so keep the page next to the output folder). Each pair shows the
   references, chosen | rejected side by side, the phi values, Delta (Eq. 8) and the metrics that passed
   (Eq. 9), and accept / reject buttons. "Download decisions" saves ``decisions.json``.
2. :func:`read_decisions` reads that file, or one written by hand: JSON ``{"pair_id": "accept", ...}``
   (optionally under a ``"decisions"`` key), a JSON list of ``{"pair_id", "decision"}``, or CSV with the
   header ``pair_id,decision``. Decisions are ``accept`` or ``reject``.
3. :func:`apply_decisions` writes the manifest of accepted pairs in the DPO trainer's format, paths relative
   to the manifest's folder::

       {"chosen": "...", "rejected": "...", "refs": [...], "prompt": "...", "task": "group", "pair_id": "...",
        "policy": "anchor", "phi_chosen": {...}, "phi_rejected": {...}, "delta": {...}, "passed": ["id"]}
"""
from __future__ import annotations

import csv
import html
import json
import logging
import os
from pathlib import Path

from ..errors import ManifestError
from ..jsonl import raise_problems, read_jsonl, write_jsonl_atomic
from ..reviewpage import download_script, thumb, write_page
from .build import relpath
from .config import METRICS

__all__ = ["read_pairs", "write_review_page", "read_decisions", "apply_decisions", "DECISIONS"]

log = logging.getLogger("idglow")
DECISIONS = ("accept", "reject")
_PATH_KEYS = ("chosen", "rejected")


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Read ``pairs.jsonl``; paths in the records are made absolute (resolved from the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Pairs file '{path}' does not exist. Run `make_pairs.py build` first; it writes "
                            f"pairs.jsonl into its output folder.")
    pairs, problems = [], []
    for lineno, rec in read_jsonl(path, problems):
        missing = [k for k in ("pair_id", "chosen", "rejected", "refs", "prompt", "task") if k not in rec]
        if missing:
            problems.append(f"line {lineno}: missing {missing}")
            continue
        for key in _PATH_KEYS:
            rec[key] = str((path.parent / rec[key]).resolve())
        rec["refs"] = [str((path.parent / r).resolve()) for r in rec["refs"]]
        pairs.append(rec)
    ids = [p["pair_id"] for p in pairs]
    if len(set(ids)) != len(ids):
        problems.append("pair_id values are not unique")
    raise_problems(problems, f"Pairs file '{path}'", "rebuild it with `make_pairs.py build`")
    return pairs


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _metric_rows(p: dict) -> str:
    rows = []
    for m in METRICS:
        w, l = (p.get("phi_chosen") or {}).get(m), (p.get("phi_rejected") or {}).get(m)
        d = (p.get("delta") or {}).get(m)
        cls = ' class="pass"' if m in p.get("passed", []) else ""
        rows.append(f"<tr{cls}><td>phi_{m}</td><td>{_fmt(w)}</td><td>{_fmt(l)}</td><td>{_fmt(d)}</td></tr>")
    return "".join(rows)


def _pair_html(p: dict, folder: Path) -> str:
    e = html.escape
    pid = e(p["pair_id"], quote=True)

    def img(path: str, cls: str) -> str:
        return thumb(path, folder, cls)

    refs = "".join(img(r, "ref") for r in p["refs"])
    params = e(json.dumps(p.get("rejected_params") or {}))
    return (f'<section class="pair" data-pair="{pid}"><h2>{pid}</h2>'
            f'<p>policy <b>{e(p.get("policy", ""))}</b> · task {e(p["task"])} · rejected: '
            f'{e(p.get("rejected_source", ""))} {params} · passed: <b>{e(", ".join(p.get("passed", [])))}</b></p>'
            f'<p class="prompt">{e(p["prompt"])}</p><div class="refs">{refs}</div>'
            f'<div class="row"><figure>{img(p["chosen"], "cand")}<figcaption>chosen</figcaption></figure>'
            f'<figure>{img(p["rejected"], "cand")}<figcaption>rejected</figcaption></figure>'
            f'<table><tr><th></th><th>chosen</th><th>rejected</th><th>Delta</th></tr>{_metric_rows(p)}</table></div>'
            f'<label><input type="radio" name="{pid}" value="accept" checked> accept</label> '
            f'<label><input type="radio" name="{pid}" value="reject"> reject</label></section>')


_STYLE = (".pair{border:1px solid #ccc;margin:1em 0;padding:.5em}.ref{height:80px;margin-right:4px}"
          ".cand{max-height:320px;max-width:45vw}.row{display:flex;gap:1em;align-items:flex-start}"
          "tr.pass{background:#d8f5d8}")
_SCRIPT = ("function decisions(){const d={};document.querySelectorAll('section.pair').forEach(s=>{"
           "const c=s.querySelector('input:checked');d[s.dataset.pair]=c?c.value:'reject';});return d;}"
           "function collect(){return {decisions:decisions()};}" + download_script("collect"))


def write_review_page(pairs_path: str | os.PathLike, html_path: str | os.PathLike) -> Path:
    """Write the review page for ``pairs.jsonl`` to ``html_path`` (atomically). Returns its path."""
    pairs = read_pairs(pairs_path)
    html_path = Path(html_path)
    body = "".join(_pair_html(p, html_path.parent) for p in pairs)
    bar = (f"<b>{len(pairs)} pairs</b> from {html.escape(str(pairs_path))}. Reject pairs whose chosen image has "
           f"visible defects or whose preference is ambiguous (every pair starts as accept).")
    write_page(html_path, "IdGlow preference pairs", bar, body, _STYLE, _SCRIPT)
    log.info("review page with %d pairs: %s", len(pairs), html_path)
    return html_path


def _normalise(value) -> str | None:
    v = str(value).strip().lower()
    return {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}.get(v)


def _raw_decisions(path: Path) -> list[tuple[str, object]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or not {"pair_id", "decision"} <= set(reader.fieldnames):
            raise ManifestError(f"Decisions CSV '{path}' needs the header 'pair_id,decision', got "
                                f"{reader.fieldnames}.")
        return [(row["pair_id"], row["decision"]) for row in reader]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"Decisions file '{path}' is not valid JSON ({exc.msg}). Use the file the review "
                            f"page downloads, or CSV with the header pair_id,decision.") from exc
    if isinstance(data, dict) and isinstance(data.get("decisions"), (dict, list)):
        data = data["decisions"]
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list) and all(isinstance(r, dict) and "pair_id" in r and "decision" in r for r in data):
        return [(r["pair_id"], r["decision"]) for r in data]
    raise ManifestError(f"Decisions file '{path}' must map pair_id -> 'accept'/'reject' or be a list of "
                        f"{{\"pair_id\", \"decision\"}} objects.")


def read_decisions(path: str | os.PathLike, pair_ids: list[str] | None = None) -> dict[str, bool]:
    """``{pair_id: True (accept) | False (reject)}``. With ``pair_ids``, ids that are not pairs are an error."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Decisions file '{path}' does not exist. Download it from the review page.")
    out, problems = {}, []
    for pid, value in _raw_decisions(path):
        decision = _normalise(value)
        if decision is None:
            problems.append(f"{pid}: decision {value!r} is not one of {DECISIONS}")
        elif pair_ids is not None and pid not in pair_ids:
            problems.append(f"{pid}: no such pair (was the page made from another pairs.jsonl?)")
        else:
            out[str(pid)] = decision == "accept"
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in decisions file '{path}':\n  " + "\n  ".join(problems))
    return out


def apply_decisions(pairs_path: str | os.PathLike, decisions_path: str | os.PathLike,
                    manifest_path: str | os.PathLike, require_all: bool = False) -> int:
    """Write the accepted pairs to ``manifest_path`` (JSONL, DPO format). Pairs without a decision are left
    out (or, with ``require_all``, an error). Returns the number of pairs written."""
    pairs = read_pairs(pairs_path)
    decisions = read_decisions(decisions_path, [p["pair_id"] for p in pairs])
    undecided = [p["pair_id"] for p in pairs if p["pair_id"] not in decisions]
    if undecided and require_all:
        raise ManifestError(f"{len(undecided)} pair(s) have no decision, e.g. {undecided[:3]}. Review them, or "
                            f"drop --require-all to leave them out.")
    if undecided:
        log.warning("%d pair(s) without a decision are left out", len(undecided))
    manifest_path = Path(manifest_path)
    folder = manifest_path.parent
    records = []
    for p in pairs:
        if decisions.get(p["pair_id"]):
            rec = {"chosen": relpath(Path(p["chosen"]), folder), "rejected": relpath(Path(p["rejected"]), folder),
                   "refs": [relpath(Path(r), folder) for r in p["refs"]], "prompt": p["prompt"], "task": p["task"]}
            rec.update({k: p[k] for k in ("pair_id", "policy", "phi_chosen", "phi_rejected", "delta", "passed")
                        if k in p})
            records.append(rec)
    write_jsonl_atomic(records, manifest_path)
    log.info("%d of %d pairs accepted -> %s", len(records), len(pairs), manifest_path)
    return len(records)
