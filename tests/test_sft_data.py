"""make_sft_data on real photos with dlib: the public-domain test photos, composites of them, and insightface's
t1.jpg read from the installed package (never committed).

Photo set: obama, obama2, obama3, biden, astronaut (one face each: portrait sources), obama_small (a resized copy
of obama: a near-duplicate), t1 (6 faces: more than 4, a portrait source), t1_left (t1's three left faces: people
seen nowhere else), group_a = obama3 | mirrored biden, group_b = mirrored astronaut | obama2.
Only Obama has photos of different shots; a mirrored copy is the same shot (dlib cosine >= 0.988 measured), so
by default no group row finds a reference for Biden / the astronaut / the t1 people outside its own target.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idglow_core.errors import ConfigError, ManifestError
from idglow_core.faces import DLIB_SAME_PERSON_COSINE, load_analyzer
from idglow_core.sftdata import SftDataConfig, apply_review, build_sft_data
from idglow_core.sftdata.cluster import cluster_faces
from idglow_core.sftdata.rows import split_by_identity
from idglow_core.sftdata.scan import dhash, hamming
from idglow_core.training.data import read_manifest

REPO = Path(__file__).resolve().parents[1]
T1 = 6


def _t1() -> Path:
    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.is_file():
        pytest.skip(f"{path} is not in this insightface install")
    return path


def _side_by_side(images, out: Path) -> None:
    canvas = Image.new("RGB", (sum(i.width for i in images) + 40, max(i.height for i in images)), (235, 235, 235))
    x = 0
    for i in images:
        canvas.paste(i, (x, 0))
        x += i.width + 40
    canvas.save(out, quality=95)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for n in ("obama", "obama2", "obama3", "biden", "astronaut"):
        shutil.copy(data_dir / f"{n}.jpg", root / f"{n}.jpg")
    ob = Image.open(data_dir / "obama.jpg")
    ob.resize((ob.width * 4 // 5, ob.height * 4 // 5)).save(root / "obama_small.jpg")
    t1 = Image.open(_t1()).convert("RGB")
    t1.save(root / "t1.jpg")
    t1.crop((0, 0, t1.width // 2, t1.height)).save(root / "t1_left.jpg")
    mirror = lambda n: Image.open(data_dir / f"{n}.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # noqa: E731
    _side_by_side([Image.open(data_dir / "obama3.jpg"), mirror("biden")], root / "group_a.jpg")
    _side_by_side([mirror("astronaut"), Image.open(data_dir / "obama2.jpg")], root / "group_b.jpg")
    return root


@pytest.fixture(scope="module")
def analyzer():
    return load_analyzer("dlib")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _faces(out: Path) -> list[dict]:
    return _jsonl(out / "state" / "faces.jsonl")


def _identity(faces, photo, index=0):
    return next(f["identity"] for f in faces if f["photo"] == photo and f["index"] == index)


@pytest.fixture(scope="module")
def default_build(photos, analyzer, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_default")
    return out, build_sft_data(photos, out, analyzer, SftDataConfig())


def test_obama_photos_form_one_identity_at_the_measured_threshold(default_build):
    out, report = default_build
    faces = _faces(out)
    emb = np.load(out / "state" / "embeddings.npy")
    assert report["same_person_cosine"] == DLIB_SAME_PERSON_COSINE == 0.92 and report["backend"] == "dlib"
    obama = {_identity(faces, p) for p in ("obama.jpg", "obama2.jpg", "obama3.jpg")}
    assert len(obama) == 1
    assert _identity(faces, "group_a.jpg", 0) in obama and _identity(faces, "group_b.jpg", 1) in obama
    biden = _identity(faces, "biden.jpg")
    assert biden not in obama and biden == _identity(faces, "group_a.jpg", 1)
    # the measurements behind the threshold (cluster.py's docstring)
    e = {f["photo"]: emb[i] for i, f in enumerate(faces) if f["photo"] in ("obama.jpg", "obama2.jpg", "obama3.jpg",
                                                                           "biden.jpg")}
    same = [float(e[a] @ e[b]) for a, b in (("obama.jpg", "obama2.jpg"), ("obama.jpg", "obama3.jpg"),
                                            ("obama2.jpg", "obama3.jpg"))]
    assert 0.94 < min(same) and max(same) < 0.97
    assert float(e["obama.jpg"] @ e["biden.jpg"]) < 0.85
    t1 = emb[[i for i, f in enumerate(faces) if f["photo"] == "t1.jpg"]]
    assert len(t1) == T1 and (t1 @ t1.T)[~np.eye(T1, dtype=bool)].max() < DLIB_SAME_PERSON_COSINE
    assert len({_identity(faces, "t1.jpg", i) for i in range(T1)}) == T1


def test_no_reference_is_cut_from_its_target_and_every_skipped_photo_has_a_reason(default_build, photos):
    out, report = default_build
    assert report["photos"] == 10 and report["rows"] == 0
    assert report["skipped"] == {"near_duplicate": 1, "no_other_portrait": 3, "too_few_faces": 5,
                                 "too_many_faces": 1}
    assert sum(report["skipped"].values()) + report["rows"] == report["photos"]
    why = report["skipped_photos"]
    assert why["obama_small.jpg"].startswith("near-duplicate of obama.jpg")
    assert "portrait source" in why["t1.jpg"] and "portrait source" in why["biden.jpg"]
    biden = _identity(_faces(out), "biden.jpg")
    assert biden in why["group_a.jpg"] and "no portrait from another photo" in why["group_a.jpg"]
    assert _jsonl(out / "train.jsonl") == [] and (out / "review.html").is_file()


@pytest.fixture(scope="module")
def self_ref_build(photos, analyzer, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_self")
    return out, build_sft_data(photos, out, analyzer, SftDataConfig(allow_self_refs=True, val_fraction=0.3))


def test_self_references_only_with_the_flag_and_marked(self_ref_build):
    out, report = self_ref_build
    rows = _jsonl(out / "rows.jsonl")
    assert report["rows"] == report["self_ref_rows"] == 3
    assert {r["row_id"] for r in rows} == {"group_a.jpg", "group_b.jpg", "t1_left.jpg"}
    for r in rows:
        assert r["self_ref"] and any(r["self_ref_mask"])
        for photo, is_self in zip(r["ref_photos"], r["self_ref_mask"]):
            assert (photo == r["row_id"]) == is_self
    ga = next(r for r in rows if r["row_id"] == "group_a.jpg")
    assert ga["self_ref_mask"] == [False, True]                         # Obama from another photo, Biden from it
    assert ga["ref_photos"][0] in ("obama.jpg", "obama2.jpg", "group_b.jpg")  # never obama3: the same shot
    # split by identity: t1_left's people share no row with the others -> they alone go to val
    assert {r["row_id"] for r in rows if r["split"] == "val"} == {"t1_left.jpg"}
    train_ids = {i for r in rows if r["split"] == "train" for i in r["identities"]}
    assert not train_ids & {i for r in rows if r["split"] == "val" for i in r["identities"]}
    samples = read_manifest(out / "train.jsonl", load_analyzer("dlib"))    # the SFT trainer reads it, refs have faces
    assert len(samples) == 2 and all(len(s.ref_faces) == 2 for s in samples)
    val = _jsonl(out / "val.jsonl")[0]
    assert val["self_ref"] is True and len(val["refs"]) == 3 and val["prompt"].startswith("A natural")


@pytest.fixture(scope="module")
def strict_build(photos, analyzer, tmp_path_factory):
    """threshold 0.975, above Obama's 0.944-0.968: his photos fall apart and a reviewer must merge them."""
    out = tmp_path_factory.mktemp("sft_strict")
    return out, build_sft_data(photos, out, analyzer, SftDataConfig(threshold=0.975, allow_self_refs=True,
                                                                    val_fraction=0.0))


def test_review_decisions_merge_split_and_reject(strict_build, tmp_path):
    out, report = strict_build
    faces = _faces(out)
    obama = [_identity(faces, p) for p in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    assert len(set(obama)) == 3
    rows = {r["row_id"]: r for r in _jsonl(out / "rows.jsonl")}
    assert set(rows) == {"group_a.jpg", "group_b.jpg", "t1_left.jpg"}
    assert rows["group_a.jpg"]["ref_photos"] == ["group_a.jpg", "group_a.jpg"]   # only obama3's shot is his
    page = (out / "review.html").read_text()
    assert all(f'data-id="{i}"' in page for i in obama) and 'data-row="group_b.jpg"' in page
    assert page.count("reference cut from the target") == 3
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(not s.startswith(("/", "http")) and (out / s).is_file() for s in srcs)

    decisions = {"clusters": {obama[1]: {"action": "merge", "into": obama[0]},
                              obama[2]: {"action": "merge", "into": obama[1]}},   # a chain: 3 -> 2 -> 1
                 "faces": {}, "rows": {}}
    (tmp_path / "merge.json").write_text(json.dumps(decisions))
    merged = apply_review(out, tmp_path / "merge.json")
    rows = {r["row_id"]: r for r in _jsonl(out / "rows.jsonl")}
    ga = rows["group_a.jpg"]
    assert ga["identities"][0] == obama[0] and ga["self_ref_mask"] == [False, True]
    assert ga["ref_photos"][0] in ("obama.jpg", "obama2.jpg", "group_b.jpg")        # another shot of him now
    assert merged["review"]["merged"] == 2 and merged["identities"] == report["identities"] - 2

    astronaut_face = next(f["face_id"] for f in faces if f["photo"] == "group_b.jpg" and f["index"] == 0)
    t1_person = _identity(faces, "t1.jpg", 0)
    decisions["faces"] = {astronaut_face: "split"}                  # not the astronaut after all
    decisions["clusters"][t1_person] = {"action": "reject"}
    decisions["rows"] = {"group_a.jpg": "reject"}
    (tmp_path / "more.json").write_text(json.dumps(decisions))
    after = apply_review(out, tmp_path / "more.json")
    rows = {r["row_id"]: r for r in _jsonl(out / "rows.jsonl")}
    assert set(rows) == {"group_b.jpg"} and after["rows"] == 1
    assert rows["group_b.jpg"]["identities"][0].endswith(astronaut_face)
    assert after["skipped_photos"]["group_a.jpg"] == "rejected in review"
    assert after["skipped"]["rejected_face"] == 1                    # t1_left holds the rejected person
    assert _faces(out)[0]["identity"] == faces[0]["identity"]      # the build's state is never changed
    again = apply_review(out, tmp_path / "merge.json")            # so another decisions file starts afresh
    assert again["rows"] == 3

    (tmp_path / "bad.json").write_text(json.dumps({"clusters": {"id_999": {"action": "merge", "into": "x"}},
                                                   "faces": {"f99999": "split"}, "rows": {"nope.jpg": "maybe"}}))
    with pytest.raises(ManifestError, match="4 problem"):
        apply_review(out, tmp_path / "bad.json")


def test_the_page_script_downloads_decisions_that_apply_reads(strict_build, tmp_path):
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the page's inline JS is not run")
    out, _ = strict_build
    page = (out / "review.html").read_text()
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    idents = re.findall(r'<section class="ident" data-id="([^"]+)"', page)
    face_ids = re.findall(r'<figure class="face" data-face="([^"]+)"', page)
    rows = re.findall(r'<section class="row" data-row="([^"]+)"', page)
    # A DOM stand-in: the first identity merged into the second, the first face rejected, the first row rejected.
    stub = ("const I=%s, F=%s, R=%s; let saved=null;\n"
            "const ident=(id,i)=>({dataset:{id},querySelector:(s)=>s==='input.merge'?{value:i===0?I[1]:''}:"
            "{value:'keep'}});\n"
            "const face=(id,i)=>({dataset:{face:id},querySelector:()=>({value:i===0?'reject':'keep'})});\n"
            "const row=(id,i)=>({dataset:{row:id},querySelector:()=>({value:i===0?'reject':'accept'})});\n"
            "global.document={querySelectorAll:(s)=>s==='section.ident'?I.map(ident):s==='figure.face'?F.map(face):"
            "R.map(row),createElement:()=>({click(){}})};\n"
            "global.Blob=class{constructor(p){saved=p.join('');}};global.URL={createObjectURL:()=>'blob:x'};\n"
            % (json.dumps(idents), json.dumps(face_ids), json.dumps(rows)))
    js = tmp_path / "run.js"
    js.write_text(stub + script + "\ndownload(); require('fs').writeFileSync(process.argv[2], saved);\n")
    subprocess.run(["node", str(js), str(tmp_path / "decisions.json")], check=True, timeout=60)
    got = json.loads((tmp_path / "decisions.json").read_text())
    assert got["clusters"][idents[0]] == {"action": "merge", "into": idents[1]}
    assert got["faces"] == {face_ids[0]: "reject"} and got["rows"][rows[0]] == "reject"
    report = apply_review(out, tmp_path / "decisions.json")
    assert report["review"]["rows_rejected"] == 1 and report["review"]["faces_changed"] == 1
    assert report["skipped"].get("rejected_row", 0) + report["skipped"].get("rejected_face", 0) >= 1


@pytest.mark.slow
def test_command_line_build_and_apply(photos, tmp_path):
    small = tmp_path / "photos"                         # a small set: Obama twice, group_a, Biden
    small.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "group_a.jpg"):
        shutil.copy(photos / name, small / name)
    out = tmp_path / "sft"
    cmd = [sys.executable, str(REPO / "train" / "make_sft_data.py")]
    r = subprocess.run([*cmd, "build", "--photos", str(small), "--out", str(out), "--backend", "dlib",
                        "--allow-self-refs"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[0])
    assert got["rows"] == got["self_ref_rows"] == 1 and got["skipped"] == {"too_few_faces": 3}
    (tmp_path / "d.json").write_text(json.dumps({"rows": {"group_a.jpg": "reject"}}))
    r = subprocess.run([*cmd, "apply", "--out", str(out), "--decisions", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[0])
    assert got["rows"] == 0 and got["skipped"]["rejected_row"] == 1
    with pytest.raises(ManifestError, match="Run `make_sft_data.py build"):
        apply_review(tmp_path / "nothing", tmp_path / "d.json")


def test_units_hash_cluster_and_split():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert hamming(dhash(img), dhash(np.ascontiguousarray(img[:, ::-1]))) > 10
    assert hamming(dhash(img), dhash(img)) == 0
    a, b = np.eye(4)[0], np.eye(4)[1]
    emb = np.stack([a, a + 0.05 * b, a + 0.2 * b, b])  # face 0 fits the cluster better than face 2
    labels = cluster_faces(emb, ["p1", "p2", "p1", "p3"], threshold=0.9)
    assert labels[0] == labels[1] != labels[2]          # faces 0 and 2 share a photo: never one person
    assert labels[3] not in (labels[0], labels[2])
    rows = [{"row_id": "r1", "identities": ["a", "b"]}, {"row_id": "r2", "identities": ["b", "c"]},
            {"row_id": "r3", "identities": ["d", "e"]}, {"row_id": "r4", "identities": ["f", "g"]}]
    split = split_by_identity(rows, 0.25, seed=0)
    assert split["r1"] == split["r2"]                   # they share b
    assert sum(v == "val" for v in split.values()) == 1
    assert split_by_identity(rows[:1], 0.5, 0) == {"r1": "train"}  # never every row in val
    with pytest.raises(ConfigError):
        SftDataConfig(min_faces=3, max_faces=2)


def test_prompts_come_from_the_enricher_and_survive_a_review_unless_the_references_change(strict_build, tmp_path,
                                                                                        monkeypatch):
    from idglow_core.prompting import enricher

    out, _ = strict_build
    faces = _faces(out)
    calls = []

    def fake_enrich(vlm, images, instruction, task="group", k=None, seed=0, config=None):
        calls.append(len(images))
        return enricher.EnrichResult(f"enriched prompt {len(calls)}", "vlm")

    monkeypatch.setattr(enricher, "enrich_prompt", fake_enrich)
    obama = [_identity(faces, p) for p in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    (tmp_path / "none.json").write_text(json.dumps({}))
    apply_review(out, tmp_path / "none.json", vlm=object())       # same references as the build: its prompts stay
    assert calls == [] and {r["prompt_source"] for r in _jsonl(out / "rows.jsonl")} == {"static"}
    (tmp_path / "merge.json").write_text(json.dumps({"clusters": {obama[1]: {"action": "merge", "into": obama[0]},
                                                                  obama[2]: {"action": "merge", "into": obama[0]}}}))
    apply_review(out, tmp_path / "merge.json", vlm=object())      # both groups' Obama references change
    rows = {r["row_id"]: r for r in _jsonl(out / "rows.jsonl")}
    assert calls == [2, 2] and rows["group_a.jpg"]["prompt"] == "enriched prompt 1"
    assert rows["group_b.jpg"]["prompt"] == "enriched prompt 2" and rows["group_b.jpg"]["prompt_source"] == "vlm"
    assert rows["t1_left.jpg"]["prompt_source"] == "static"       # unchanged references: the build's prompt
    assert _jsonl(out / "train.jsonl")[0]["prompt"] in {r["prompt"] for r in rows.values()}
