"""The two steps of ``train/make_sft_data.py`` and the files they write into the output folder.

:func:`build_sft_data` scans the photos, clusters the faces and writes (paths relative to the folder):

- ``train.jsonl`` / ``val.jsonl``: the SFT manifests (``{"target", "refs", "prompt", "task", ...}``, the
  format of :mod:`idglow_core.training.data`); no identity is in both;
- ``rows.jsonl``: every row with its split, identities, reference faces and the photos they were cut from;
  ``self_ref: true`` marks a row with a reference cut from its own target (only with ``allow_self_refs``);
- ``faces/<face_id>.jpg``: the portrait crops (the references); ``review.html``: the review page;
- ``report.json``: counts, thresholds, and every photo that gave no row with its reason;
- ``state/``: photos, faces, embeddings and prompts of the build, which :func:`apply_review` reads.

:func:`apply_review` applies the reviewer's decisions to the build's clusters and rewrites the outputs (the
state is never changed, so applying again, or another decisions file, starts from the same build).
"""
from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import InputError, ManifestError
from ..jsonl import read_jsonl, write_jsonl_atomic
from ..prompting.templates import static_prompt
from .review import read_decisions, relabel, write_sft_review_page
from .rows import SAME_SHOT_COSINE, SftDataConfig, build_rows, split_by_identity

__all__ = ["SftDataConfig", "build_sft_data", "apply_review"]

log = logging.getLogger("idglow")
_MANIFEST_KEYS = ("target", "refs", "prompt", "task", "row_id", "identities", "self_ref")


def _write_json(data, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _prompt(row: dict, out_dir: Path, vlm, enrich_config, cache: dict) -> tuple[str, str]:
    hit = cache.get(row["row_id"])
    if hit and hit["refs"] == row["refs"]:
        return hit["prompt"], hit["source"]
    if vlm is None:
        return static_prompt(row["task"], len(row["refs"])), "static"
    from ..images import load_image
    from ..prompting.enricher import enrich_prompt

    res = enrich_prompt(vlm, [load_image(out_dir / r) for r in row["refs"]], "", task=row["task"],
                        k=len(row["refs"]), config=enrich_config)
    return res.prompt, res.source


def _outputs(out_dir: Path, state: dict, labels: list, rejected_rows: set, vlm=None, enrich_config=None,
             review: dict | None = None) -> dict:
    cfg: SftDataConfig = state["config"]
    rows, skipped = build_rows(state["photos"], state["faces"], state["emb"], labels, cfg, state["same_shot"],
                               rejected_rows)
    split = split_by_identity(rows, cfg.val_fraction, cfg.seed)
    photos_dir = Path(state["photos_dir"])
    prompts = {}
    for r in rows:
        r["prompt"], r["prompt_source"] = _prompt(r, out_dir, vlm, enrich_config, state["prompts"])
        prompts[r["row_id"]] = {"refs": r["refs"], "prompt": r["prompt"], "source": r["prompt_source"]}
        r["target"] = Path(os.path.relpath(photos_dir / r["target"], out_dir)).as_posix()
        r["split"] = split[r["row_id"]]
    write_jsonl_atomic(rows, out_dir / "rows.jsonl")
    for part in ("train", "val"):
        write_jsonl_atomic([{k: r[k] for k in _MANIFEST_KEYS} for r in rows if r["split"] == part],
                           out_dir / f"{part}.jsonl")
    reasons = {p["photo"]: (p["code"], p["reason"]) for p in state["photos"] if p["status"] == "skipped"}
    reasons.update({k: (v.code, v.detail) for k, v in skipped.items()})
    counts = collections.Counter(code for code, _ in reasons.values())
    ids = {i for r in rows for i in r["identities"]}
    report = {"photos": len(state["photos"]), "faces": len(state["faces"]), "rows": len(rows),
              "train": sum(r["split"] == "train" for r in rows), "val": sum(r["split"] == "val" for r in rows),
              "self_ref_rows": sum(r["self_ref"] for r in rows), "identities_in_rows": len(ids),
              "identities": len({lab for lab in labels if lab is not None}),
              "skipped": dict(sorted(counts.items())), "skipped_photos": {k: v[1] for k, v in sorted(reasons.items())},
              "backend": state["backend"], "same_person_cosine": state["threshold"],
              "same_shot_cosine": state["same_shot"], "config": asdict(cfg), "review": review}
    _write_json(report, out_dir / "report.json")
    state["prompts"].update(prompts)
    return report


def _save_state(out_dir: Path, state: dict) -> None:
    folder = out_dir / "state"
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(state["photos"], folder / "photos.jsonl")
    write_jsonl_atomic([{**f, "identity": lab} for f, lab in zip(state["faces"], state["labels"])],
                       folder / "faces.jsonl")
    np.save(folder / "embeddings.npy", state["emb"], allow_pickle=False)
    _write_json({"photos_dir": state["photos_dir"], "backend": state["backend"], "threshold": state["threshold"],
                 "same_shot": state["same_shot"], "config": asdict(state["config"])}, folder / "build.json")
    _write_json(state["prompts"], folder / "prompts.json")


def _load_state(out_dir: Path) -> dict:
    folder = out_dir / "state"
    if not (folder / "build.json").is_file():
        raise ManifestError(f"'{out_dir}' holds no build (state/build.json is missing). Run `make_sft_data.py "
                            f"build --out {out_dir}` first.")
    meta = json.loads((folder / "build.json").read_text(encoding="utf-8"))
    faces = [rec for _, rec in read_jsonl(folder / "faces.jsonl", [])]
    return {**meta, "config": SftDataConfig(**meta["config"]), "faces": faces,
            "labels": [f.pop("identity") for f in faces],
            "photos": [rec for _, rec in read_jsonl(folder / "photos.jsonl", [])],
            "emb": np.load(folder / "embeddings.npy", allow_pickle=False),
            "prompts": json.loads((folder / "prompts.json").read_text(encoding="utf-8"))}


def build_sft_data(photos_dir: str | os.PathLike, out_dir: str | os.PathLike, analyzer,
                   config: SftDataConfig | None = None, vlm=None, enrich_config=None) -> dict:
    """Scan, cluster and write the SFT data (see the module doc). Returns the report.

    analyzer: a face backend (``analyzer.name`` picks the thresholds). vlm: optional prompt enricher bundle."""
    from .cluster import cluster_faces, same_person_threshold  # face-backend imports: only the build needs them
    from .scan import scan_photos

    config = config or SftDataConfig()
    photos_dir, out = Path(photos_dir), Path(out_dir)
    if not photos_dir.is_dir():
        raise InputError(f"Photo folder '{photos_dir}' does not exist. Pass the folder of your group photos.")
    threshold = same_person_threshold(analyzer.name, config.threshold)
    same_shot = config.same_shot_cosine or SAME_SHOT_COSINE.get(analyzer.name, 0.95)
    photos, faces, emb = scan_photos(photos_dir, out, analyzer, config.dup_hamming, config.min_face_px,
                                     config.crop_margin)
    labels = [f"id_{i:03d}" for i in cluster_faces(emb, [f["photo"] for f in faces], threshold)]
    state = {"photos_dir": str(photos_dir.resolve()), "backend": analyzer.name, "threshold": threshold,
             "same_shot": same_shot, "config": config, "photos": photos, "faces": faces, "emb": emb,
             "labels": labels, "prompts": {}}
    report = _outputs(out, state, labels, set(), vlm, enrich_config)
    _save_state(out, state)
    rows = [rec for _, rec in read_jsonl(out / "rows.jsonl", [])]
    write_sft_review_page(out, faces, labels, rows)
    log.info("SFT data: %d rows (%d train, %d val) from %d photos; skipped %s", report["rows"], report["train"],
             report["val"], report["photos"], report["skipped"])
    return report


def apply_review(out_dir: str | os.PathLike, decisions_path: str | os.PathLike, vlm=None, enrich_config=None) -> dict:
    """Apply ``decisions.json`` (from review.html) to the build in ``out_dir``; rewrite its outputs."""
    out = Path(out_dir)
    state = _load_state(out)
    decisions = read_decisions(decisions_path, set(state["labels"]), {f["face_id"] for f in state["faces"]},
                               {p["photo"] for p in state["photos"]})
    labels, rejected_rows = relabel(state["faces"], state["labels"], decisions)
    summary = {"decisions": str(decisions_path), "merged": sum(1 for d in decisions["clusters"].values()
                                                               if isinstance(d, dict) and d.get("action") == "merge"),
               "faces_changed": len(decisions["faces"]), "rows_rejected": len(rejected_rows)}
    report = _outputs(out, state, labels, rejected_rows, vlm, enrich_config, review=summary)
    log.info("review applied: %d rows (%d train, %d val)", report["rows"], report["train"], report["val"])
    return report
