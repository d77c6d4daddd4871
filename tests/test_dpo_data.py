"""DPO pair data: up-front manifest validation (every problem listed with its line), the synthetic pair set,
pair encoding (chosen and rejected latents of the same size) and batching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idglow_core.errors import ManifestError
from idglow_core.faces.base import Face
from idglow_core.images import load_image
from idglow_core.training.dpo_data import collate_pairs, read_pair_manifest, write_synthetic_pairs


class BrightFaceAnalyzer:
    """Finds one face in any image whose mean brightness is above 20 (a black image has no face)."""

    name, embedding_dim = "stub", 8

    def analyze(self, image):
        if image.mean() < 20:
            return []
        h, w = image.shape[:2]
        kps = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32) * [w, h]
        emb = np.arange(1, 9, dtype=np.float32)
        return [Face(np.array([0, 0, w, h], np.float32), kps.astype(np.float32), 1.0, emb / np.linalg.norm(emb))]


def _img(path: Path, value: int, size=(64, 64)) -> str:
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path.name


def test_every_problem_is_listed_with_its_line(tmp_path):
    ok, ok2, black = _img(tmp_path / "ok.png", 200), _img(tmp_path / "ok2.png", 150), _img(tmp_path / "black.png", 0)
    wide = _img(tmp_path / "wide.png", 120, size=(64, 128))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        {"chosen": ok, "rejected": ok2, "refs": [ok, ok2], "prompt": "two people", "task": "group"},  # 1 fine
        {"chosen": ok, "rejected": "missing.png", "refs": [ok], "prompt": "p"},                      # 2 missing
        {"chosen": "broken.png", "rejected": ok2, "refs": [ok, black], "prompt": "p"},  # 3 broken, no face
        "{not json",                                                                                # 4
        {"chosen": ok, "rejected": ok, "refs": [ok], "prompt": "p"},                                # 5 same file
        {"chosen": ok, "rejected": wide, "refs": [ok], "prompt": "p"},                              # 6 aspect
        {"chosen": ok, "rejected": ok2, "refs": [], "prompt": "p", "task": "party"},                # 7 bad keys
        {"chosen": ok, "rejected": ok2, "refs": [ok] * 5, "prompt": "p"},                           # 8 too many refs
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ManifestError) as err:
        read_pair_manifest(manifest, BrightFaceAnalyzer(), max_ids=4, resolution=64)
    msg = str(err.value)
    assert "line 1:" not in msg
    assert "line 2: rejected" in msg and "missing.png" in msg
    assert "line 3: chosen" in msg and "line 3: no face found in reference 2" in msg
    assert "line 4: not valid JSON" in msg and "line 5: 'chosen' and 'rejected' are the same file" in msg
    assert "line 6: chosen and rejected have different aspect ratios (64x64 vs 96x32" in msg
    assert "line 7: 'refs' must be a non-empty list" in msg and "'task' must be one of" in msg
    assert "line 8: 5 references" in msg and "8 problem(s)" in msg


def test_valid_manifest_keeps_faces_and_paths(tmp_path):
    ok, ok2 = _img(tmp_path / "ok.png", 200), _img(tmp_path / "ok2.png", 150)
    (tmp_path / "m.jsonl").write_text(json.dumps({"chosen": ok, "rejected": ok2, "refs": [ok, ok2, ok],
                                                  "prompt": "three", "task": "age", "pair_id": "x"}) + "\n\n")
    (pair,) = read_pair_manifest(tmp_path / "m.jsonl", BrightFaceAnalyzer(), max_ids=4, resolution=32)
    assert pair.chosen == tmp_path / ok and pair.rejected == tmp_path / ok2 and pair.task == "age"
    assert len(pair.ref_faces) == 3 and pair.as_sample().target == pair.chosen
    with pytest.raises(ManifestError, match="not found"):
        read_pair_manifest(tmp_path / "nope.jsonl")


def test_synthetic_pairs_reject_a_degraded_copy(tmp_path, data_dir):
    manifest = write_synthetic_pairs(tmp_path, 2, [data_dir / "obama.jpg", data_dir / "biden.jpg"], size=32)
    pairs = read_pair_manifest(manifest, BrightFaceAnalyzer(), resolution=32)
    assert len(pairs) == 2 and [len(p.refs) for p in pairs] == [2, 2]
    assert not (tmp_path / "manifest.jsonl").exists()  # only the DPO manifest remains
    for pair in pairs:
        chosen, rejected = load_image(pair.chosen).astype(float), load_image(pair.rejected).astype(float)
        assert chosen.shape == rejected.shape == (32, 64, 3)
        assert 5 < np.abs(chosen - rejected).mean() < 100  # degraded, but still the same photo
    # saturation 0.2 (odd pair) washes colours out: the channel spread shrinks
    spread = [load_image(pairs[1].chosen).astype(float).std(axis=2).mean(),
              load_image(pairs[1].rejected).astype(float).std(axis=2).mean()]
    assert spread[1] < 0.5 * spread[0]


def test_collate_pairs_stacks_rejected_latents():
    item = {"latents": torch.zeros(4, 1, 8, 8), "latents_rejected": torch.ones(4, 1, 8, 8),
            "ref_latents.0": torch.zeros(4, 1, 8, 8), "prompt_embeds": torch.zeros(5, 16),
            "prompt_mask": torch.ones(5, dtype=torch.long), "id_embeds": torch.zeros(2, 8)}
    short = dict(item, prompt_embeds=torch.zeros(3, 16), prompt_mask=torch.ones(3, dtype=torch.long))
    batch = collate_pairs([item, short])
    assert batch["latents"].shape == batch["latents_rejected"].shape == (2, 4, 1, 8, 8)
    assert batch["latents_rejected"].eq(1).all() and batch["prompt_mask"][1].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(Exception, match="latents_rejected"):
        collate_pairs([{k: v for k, v in item.items() if k != "latents_rejected"}])
