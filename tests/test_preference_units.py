"""Preference-pair pieces on hand-made inputs: Eq. 8-9, perturbations, config, cache, policy, metrics, review I/O."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idglow_core.errors import ConfigError, ManifestError
from idglow_core.faces.base import Face
from idglow_core.preference import (Candidate, ClipEncoder, MetricSuite, PairsConfig, Perturbation, ScoreCache,
                                    compute_deltas, context_key, file_hash, load_pairs_config, passing_metrics,
                                    person_region, propose_pairs, read_decisions, read_groups)
from idglow_core.preference.testing import write_tiny_clip

TAU = {"id": 0.05, "aes": 0.25, "sem": 0.01, "obj": 0.02}


def test_eq8_deltas_and_eq9_filter_by_hand():
    chosen = {"id": 0.80, "aes": 5.00, "sem": 0.300, "obj": None, "n_faces": 2}
    rejected = {"id": 0.70, "aes": 5.40, "sem": 0.295, "obj": 0.50, "n_faces": 1}
    d = compute_deltas(chosen, rejected)  # Eq. 8: 0.80-0.70, 5.00-5.40, 0.300-0.295; obj is off on one side
    assert set(d) == {"id", "aes", "sem"}
    assert d["id"] == pytest.approx(0.10) and d["aes"] == pytest.approx(-0.40) and d["sem"] == pytest.approx(0.005)
    assert passing_metrics(d, TAU) == ["id"]  # Eq. 9: 0.10 > 0.05; -0.40 < 0.25; 0.005 < 0.01
    assert passing_metrics(d, {**TAU, "id": 0.2}) == []  # no Delta_i > tau_i: the pair is dropped
    assert passing_metrics(d, {**TAU, "sem": 0.001}) == ["id", "sem"]  # every passing metric is recorded
    assert passing_metrics(d, {"aes": 0.25}) == []  # id/sem without a threshold never decide
    # strict inequality on exactly representable numbers: Delta = 0.75 - 0.5 = 0.25 is not > 0.25
    assert passing_metrics(compute_deltas({"aes": 0.75}, {"aes": 0.5}), {"aes": 0.25}) == []
    assert passing_metrics(compute_deltas({"aes": 0.75}, {"aes": 0.5}), {"aes": 0.125}) == ["aes"]


def test_perturbations_are_reproducible_and_match_hand_values():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50
    sat = Perturbation("saturation", 0.5).apply(img)
    # gray = 0.299*200 + 0.587*100 + 0.114*50 = 124.2; gray + 0.5*(x - gray) = 162.1, 112.1, 87.1
    assert sat[0, 0].tolist() == [162, 112, 87] and (sat == sat[0, 0]).all()
    assert Perturbation("saturation", 1.0).apply(img).tolist() == img.tolist()
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = Perturbation("noise", 0.1, seed=3).apply(photo), Perturbation("noise", 0.1, seed=3).apply(photo)
    assert np.array_equal(a, b) and not np.array_equal(a, Perturbation("noise", 0.1, seed=4).apply(photo))
    assert 15 < np.abs(a.astype(float) - photo).mean() < 30  # sigma 25.5 levels, clipped at 0/255
    err = lambda q: np.abs(Perturbation("jpeg", q).apply(photo).astype(float) - photo).mean()
    assert err(5) > err(90) > 0
    smooth = Perturbation("blur", 2.0).apply(photo)
    assert smooth.std() < 0.6 * photo.std()
    assert Perturbation("jpeg", 12, seed=2).to_dict() == {"kind": "jpeg", "strength": 12.0, "seed": 2}
    with pytest.raises(ConfigError, match="Choose from"):
        Perturbation("sepia", 1.0)
    with pytest.raises(ConfigError, match="outside"):
        Perturbation("noise", 3.0)


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("thresholds: {id: 0.1, aes: null}\nseeds: [3]\nperturbations:\n  - {kind: blur, strength: 1}\n")
    cfg = load_pairs_config(path, ["thresholds.sem=0.02", "policies=[anchor]"])
    assert cfg.thresholds == {"id": 0.1, "aes": None, "sem": 0.02} and cfg.seeds == [3]
    assert cfg.perturbations == [Perturbation("blur", 1.0)] and cfg.policies == ["anchor"]
    assert cfg.threshold("aes") is None and cfg.threshold("obj") is None
    for bad, match in [(["thresholds.depth=1"], "Unknown metric"), (["colour=1"], "Unknown pairs-config"),
                       (["policies=[random]"], "Unknown policies"), (["seeds"], "key=value"),
                       (["thresholds={id: null}"], "Every threshold is null"),
                       (["perturbations=[{kind: noise}]"], "'kind' and 'strength'")]:
        with pytest.raises(ConfigError, match=match):
            load_pairs_config(None, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_pairs_config(tmp_path / "missing.yaml")


def test_cache_roundtrip_is_atomic_and_keyed_by_content(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert file_hash(a) == file_hash(b)  # renamed/copied files keep their scores
    ctx = context_key(["r1", "r2"], "a prompt", "suite")
    assert ctx != context_key(["r1", "r2"], "another prompt", "suite") != context_key(["r2", "r1"], "a prompt", "suite")
    cache = ScoreCache(tmp_path / "c.json")
    cache.put(file_hash(a), ctx, {"id": 0.5})
    cache.save()
    assert not list(tmp_path.glob(".*.tmp"))
    again = ScoreCache(tmp_path / "c.json")
    assert again.get(file_hash(b), ctx) == {"id": 0.5} and again.get(file_hash(b), "other") is None
    (tmp_path / "bad.json").write_text("{truncated")
    with pytest.raises(ManifestError, match="delete it"):
        ScoreCache(tmp_path / "bad.json")


def _cand(cid, source, id_score, parent=None):
    return Candidate(cid, None, source, parent=parent, scores={"id": id_score, "aes": 5.0, "sem": None, "obj": None})


def test_pair_policy_anchor_best_worst_parent_without_repeats():
    cands = [_cand("real0", "real", 0.9), _cand("seed0", "generated", 0.6), _cand("seed1", "generated", 0.8),
             _cand("seed2", "generated", 0.7), _cand("real0__noise", "perturbed", 0.1, "real0"),
             _cand("seed1__blur", "perturbed", 0.5, "seed1")]
    got = [(w.id, l.id, p) for w, l, p in propose_pairs(cands, ["anchor", "best_worst", "parent"])]
    anchors = [("real0", c, "anchor") for c in ("seed0", "seed1", "seed2", "real0__noise", "seed1__blur")]
    assert got == anchors + [("seed1", "seed0", "best_worst"), ("seed1", "seed1__blur", "parent")]
    only = [(w.id, l.id) for w, l, _ in propose_pairs(cands, ["parent"])]
    assert only == [("real0", "real0__noise"), ("seed1", "seed1__blur")]


class _MarkerAnalyzer:
    """Stand-in face backend: the pixel [0, 0, 0] selects which faces an image "contains"."""

    name, embedding_dim = "marker", 3

    def __init__(self, table):
        self.table, self.calls = table, 0

    def analyze(self, image):
        self.calls += 1
        return list(self.table.get(int(image[0, 0, 0]), []))


def _face(x, emb):
    return Face(bbox=np.array([x, 20, x + 20, 50], np.float32), kps=np.zeros((5, 2), np.float32), score=1.0,
                embedding=np.asarray(emb, np.float32) / np.linalg.norm(emb))


def test_person_region_masks_the_face_box_by_hand():
    img = np.full((100, 100, 3), 7, np.uint8)
    region = person_region(img, (40, 20, 60, 50), context=1.0)
    # face 20 wide, 30 high, centre x 50: x 30..70, y 20-15=5 .. 50+2*30=110 -> clipped to 100
    assert region.shape == (95, 40, 3)
    assert (region[15:45, 10:30] == 128).all() and (region[:15] == 7).all() and (region[45:] == 7).all()
    assert (region[:, :10] == 7).all() and (region[:, 30:] == 7).all()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipEncoder.from_dir(write_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_metric_values_id_sem_obj_by_hand(clip):
    rng = np.random.default_rng(1)
    ref_a, ref_b = (rng.integers(0, 256, (100, 120, 3), dtype=np.uint8) for _ in range(2))
    ref_a[0, 0, 0], ref_b[0, 0, 0] = 1, 2
    table = {1: [_face(40, [1, 0, 0])], 2: [_face(50, [0, 1, 0])]}
    suite = MetricSuite(_MarkerAnalyzer(table), clip=clip, obj_context=1.0)
    refs = suite.references([ref_a, ref_b])
    # ref_a itself as the candidate: face A matches reference A (cos 1), reference B has no face -> strict 1/2
    s = suite.score(ref_a, refs, "two people")
    assert s["id"] == pytest.approx(0.5) and s["obj"] == pytest.approx(0.5, abs=1e-5) and s["n_faces"] == 1
    want_sem = float(clip.embed_images([ref_a])[0] @ clip.embed_texts(["two people"])[0])
    assert s["sem"] == pytest.approx(want_sem, abs=1e-6) and s["aes"] is None
    emb = clip.embed_images([ref_a])
    assert emb.shape == (1, 16) and torch.linalg.vector_norm(emb, dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    # a face with the wrong embedding: cos(A, [1,1,0]/sqrt2) = 0.7071 for one of two references
    table[3] = [_face(40, [1, 1, 0])]
    other = ref_a.copy()
    other[0, 0, 0] = 3
    assert suite.score(other, refs, "x")["id"] == pytest.approx(0.70710678 / 2, abs=1e-6)
    assert suite.metrics == ("id", "sem", "obj") and MetricSuite(suite.analyzer).metrics == ("id",)
    assert suite.signature != MetricSuite(suite.analyzer).signature


def test_groups_file_errors_are_listed_with_lines(tmp_path, data_dir):
    ref = str(data_dir / "obama.jpg")
    lines = [{"id": "ok", "refs": [ref]}, {"refs": []}, {"id": "bad id!", "refs": [ref], "task": "party"},
             {"id": "ok", "refs": [ref, "missing.jpg"]}]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    with pytest.raises(ManifestError) as info:
        read_groups(path)
    msg = str(info.value)
    for needle in ("line 2: 'refs' must be a non-empty", "line 3:", "'task' must be one of", "line 4:",
                   "missing.jpg", "line 5: not valid JSON"):
        assert needle in msg
    path.write_text(json.dumps({"refs": [ref], "task": "age"}) + "\n")
    (g,) = read_groups(path)
    assert g.id == "g0001" and "child" in g.prompt.lower()  # empty prompt -> Task 2 static template


def test_decisions_formats_and_errors(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"decisions": {"p1": "accept", "p2": "Rejected"}}))
    assert read_decisions(tmp_path / "d.json") == {"p1": True, "p2": False}
    (tmp_path / "d.csv").write_text("pair_id,decision\np1,reject\np2,accept\n")
    assert read_decisions(tmp_path / "d.csv", ["p1", "p2"]) == {"p1": False, "p2": True}
    (tmp_path / "l.json").write_text(json.dumps([{"pair_id": "p1", "decision": "accept"}]))
    assert read_decisions(tmp_path / "l.json") == {"p1": True}
    (tmp_path / "bad.json").write_text(json.dumps({"p1": "maybe", "p9": "accept"}))
    with pytest.raises(ManifestError, match=r"(?s)maybe.*p9: no such pair"):
        read_decisions(tmp_path / "bad.json", ["p1"])
    (tmp_path / "bad.csv").write_text("id,verdict\np1,accept\n")
    with pytest.raises(ManifestError, match="pair_id,decision"):
        read_decisions(tmp_path / "bad.csv")


def test_config_rejects_bad_values_directly():
    with pytest.raises(ConfigError, match="obj_context"):
        PairsConfig(obj_context=0)
    with pytest.raises(ConfigError, match="policies is empty"):
        PairsConfig(policies=[])
