"""The SFT data review page and its decisions.

The page (``review.html`` in the output folder) shows every identity cluster (its portrait crops) and every
row (target photo, references, prompt, split). A reviewer can, per identity, keep it, reject it, or merge it
into another identity (type its id); per face, keep it, split it off into its own identity, or reject it; per
row, accept or reject it. "Download decisions" saves ``decisions.json``::

    {"clusters": {"id_003": {"action": "merge", "into": "id_001"}, "id_007": {"action": "reject"}},
     "faces": {"f00012": "split", "f00031": "reject"},
     "rows": {"party/2019-05.jpg": "reject"}}

:func:`read_decisions` checks such a file (written by the page or by hand) against the build;
:func:`relabel` turns it into new face labels.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import ManifestError
from ..reviewpage import download_script, thumb, write_page

__all__ = ["write_sft_review_page", "read_decisions", "relabel"]

_STYLE = (".ident,.row{border:1px solid #ccc;margin:.6em 0;padding:.4em}.face{display:inline-block;margin:2px;"
          "text-align:center;font-size:11px}.face img{height:80px}.target{max-height:220px}.ref{height:90px}"
          ".self{outline:3px solid #d33}.grid{display:flex;gap:.6em;align-items:flex-start;flex-wrap:wrap}")
_SCRIPT = ("function collect(){const c={},f={},r={};"
           "document.querySelectorAll('section.ident').forEach(s=>{const m=s.querySelector('input.merge').value.trim();"
           "const a=s.querySelector('input.act:checked');c[s.dataset.id]=m?{action:'merge',into:m}:"
           "{action:a?a.value:'keep'};});"
           "document.querySelectorAll('figure.face').forEach(x=>{const v=x.querySelector('select').value;"
           "if(v!=='keep')f[x.dataset.face]=v;});"
           "document.querySelectorAll('section.row').forEach(s=>{const a=s.querySelector('input.rowact:checked');"
           "r[s.dataset.row]=a?a.value:'accept';});return {clusters:c,faces:f,rows:r};}" + download_script("collect"))


def _ident_html(ident: str, members: list[dict], folder: Path) -> str:
    e = html.escape
    iid = e(ident, quote=True)
    figs = "".join(
        f'<figure class="face" data-face="{e(f["face_id"], quote=True)}">{thumb(folder / f["crop"], folder, "")}'
        f'<figcaption>{e(f["face_id"])} · {e(f["photo"])}<br><select><option value="keep">keep</option>'
        f'<option value="split">split off</option><option value="reject">reject</option></select></figcaption>'
        f"</figure>" for f in members)
    return (f'<section class="ident" data-id="{iid}"><b>{iid}</b> · {len(members)} face(s) · '
            f'<label><input class="act" type="radio" name="c-{iid}" value="keep" checked> keep</label> '
            f'<label><input class="act" type="radio" name="c-{iid}" value="reject"> reject</label> '
            f'merge into <input class="merge" size="8" placeholder="id_..."><div>{figs}</div></section>')


def _row_html(row: dict, folder: Path) -> str:
    e = html.escape
    rid = e(row["row_id"], quote=True)
    refs = "".join(f'<figure class="face{" self" if s else ""}">{thumb(folder / r, folder, "ref")}'
                   f'<figcaption>{e(i)}{" (from target)" if s else ""}</figcaption></figure>'
                   for r, i, s in zip(row["refs"], row["identities"], row["self_ref_mask"]))
    return (f'<section class="row" data-row="{rid}"><b>{e(row["row_id"])}</b> · {e(row["split"])}'
            f'{" · <b>reference cut from the target</b>" if row["self_ref"] else ""}'
            f'<div class="grid">{thumb(folder / row["target"], folder, "target")}{refs}</div>'
            f'<p class="prompt">{e(row["prompt"])}</p>'
            f'<label><input class="rowact" type="radio" name="r-{rid}" value="accept" checked> accept</label> '
            f'<label><input class="rowact" type="radio" name="r-{rid}" value="reject"> reject</label></section>')


def write_sft_review_page(out_dir: Path, faces: list[dict], labels: list, rows: list[dict]) -> Path:
    """``out_dir/review.html``: identity clusters (largest first), then the rows. Paths relative to out_dir."""
    clusters: dict[str, list[dict]] = {}
    for f, lab in zip(faces, labels):
        if lab is not None:
            clusters.setdefault(lab, []).append(f)
    order = sorted(clusters, key=lambda k: (-len(clusters[k]), k))
    body = (f"<h2>Identities ({len(order)})</h2>" + "".join(_ident_html(k, clusters[k], out_dir) for k in order)
            + f"<h2>Rows ({len(rows)})</h2>" + "".join(_row_html(r, out_dir) for r in rows))
    bar = (f"<b>{len(order)} identities, {len(rows)} rows.</b> Merge clusters of one person, split off or reject "
           f"wrong faces, reject bad rows; then apply the downloaded file with <code>make_sft_data.py apply</code>.")
    return write_page(out_dir / "review.html", "IdGlow SFT data review", bar, body, _STYLE, _SCRIPT)


def read_decisions(path: str | Path, identities: set[str], face_ids: set[str], photos: set[str]) -> dict:
    """The checked decisions ``{"clusters": {...}, "faces": {...}, "rows": {...}}``; every problem listed."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Decisions file '{path}' does not exist. Download it from review.html.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"Decisions file '{path}' is not valid JSON ({exc.msg}).") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"Decisions file '{path}' must be a JSON object with clusters / faces / rows.")
    problems = [f"unknown section '{k}'" for k in data if k not in ("clusters", "faces", "rows")]
    clusters, faces, rows = (data.get(k) or {} for k in ("clusters", "faces", "rows"))
    for ident, d in clusters.items():
        action = d.get("action") if isinstance(d, dict) else d
        if ident not in identities:
            problems.append(f"clusters: no identity '{ident}' in this build")
        elif action not in ("keep", "reject", "merge"):
            problems.append(f"clusters.{ident}: action must be keep, reject or merge, got {action!r}")
        elif action == "merge" and d.get("into") not in identities:
            problems.append(f"clusters.{ident}: merge into unknown identity {d.get('into')!r}")
    problems += [f"faces.{k}: no such face" for k in faces if k not in face_ids]
    problems += [f"faces.{k}: must be keep, split or reject, got {v!r}" for k, v in faces.items()
                 if v not in ("keep", "split", "reject")]
    problems += [f"rows.{k}: no such photo" for k in rows if k not in photos]
    problems += [f"rows.{k}: must be accept or reject, got {v!r}" for k, v in rows.items()
                 if v not in ("accept", "reject")]
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in decisions file '{path}' (was the page made from "
                            f"another build?):\n  " + "\n  ".join(problems))
    return {"clusters": clusters, "faces": faces, "rows": rows}


def relabel(faces: list[dict], labels: list[str], decisions: dict) -> tuple[list, set[str]]:
    """Apply the decisions: faces split off get their own identity (``<id>-<face_id>``), merges join identities
    (chains followed), rejected identities and faces become ``None``. Returns the labels and rejected rows."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        seen = set()
        while a in parent and a not in seen:
            seen.add(a)
            a = parent[a]
        return a

    for ident, d in decisions["clusters"].items():
        if isinstance(d, dict) and d.get("action") == "merge" and d["into"] != ident:
            parent[ident] = d["into"]
    rejected = {i for i, d in decisions["clusters"].items()
                if (d.get("action") if isinstance(d, dict) else d) == "reject"}
    out = []
    for f, lab in zip(faces, labels):
        verdict = decisions["faces"].get(f["face_id"], "keep")
        if verdict == "reject" or lab in rejected:
            out.append(None)
        elif verdict == "split":
            out.append(f"{lab}-{f['face_id']}")
        else:
            root = find(lab)
            out.append(None if root in rejected else root)
    return out, {k for k, v in decisions["rows"].items() if v == "reject"}
