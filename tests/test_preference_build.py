"""Acceptance: make_pairs build -> Eq. 9 filter -> review page -> decisions -> DPO manifest, with the real dlib
face backend on the committed photos, a tiny random CLIP and aesthetic head, and a stand-in generator."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

pytest.importorskip("dlib")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("face-recognition-models is not installed", allow_module_level=True)

from idglow_core.aesthetic import AestheticMLP  # noqa: E402
from idglow_core.errors import InputError, ManifestError  # noqa: E402
from idglow_core.faces import load_analyzer  # noqa: E402
from idglow_core.images import load_image, save_image_atomic  # noqa: E402
from idglow_core.preference import METRICS, MetricSuite, PairsConfig, Perturbation, build_pairs  # noqa: E402
from idglow_core.preference.testing import write_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import make_pairs  # noqa: E402

TAU = {"id": 0.05, "aes": 0.25, "sem": 0.05, "obj": 0.02}
PROMPT = "the people at a picnic"
GENERATOR = '''
from pathlib import Path
import numpy as np
from idglow_core.images import load_image
DATA = Path(r"{data}")
def paste(names):
    ims = [load_image(DATA / f"{{n}}.jpg") for n in names]
    h = max(i.shape[0] for i in ims)
    return np.concatenate([np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0)), constant_values=200) for i in ims], 1)
RIGHT = {{2: ["obama2", "astronaut"], 3: ["obama2", "biden", "astronaut"]}}
WRONG = {{2: ["obama2", "biden"], 3: ["obama2", "biden"]}}
def generate(refs, prompt, seed):
    assert len(refs) in (2, 3) and refs[0].dtype == np.uint8 and prompt
    with open(Path(__file__).with_name("calls.txt"), "a") as fh:
        fh.write(f"{{seed}}\\n")
    # seed 0: the right people (other photos of them); other seeds: the last person is wrong or missing
    image = paste((RIGHT if seed == 0 else WRONG)[len(refs)])
    image[0, 0] = seed  # every seed a different file
    return image
'''


def paste(images):
    h = max(i.shape[0] for i in images)
    return np.concatenate([np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0)), constant_values=200) for i in images], 1)


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_dir):
    """Groups file, anchor, generator file, tiny CLIP and aesthetic folders, and one CLI build."""
    t = tmp_path_factory.mktemp("pairs")
    img = {n: load_image(data_dir / f"{n}.jpg") for n in ("obama3", "biden", "astronaut")}
    # "group photos" of the reference people: other shots of them (or mirrored ones) side by side
    save_image_atomic(paste([img["obama3"], img["astronaut"][:, ::-1]]), t / "real" / "oa.png")
    save_image_atomic(paste([img["obama3"], img["biden"][:, ::-1], img["astronaut"][:, ::-1]]), t / "real" / "oba.png")
    refs = {n: str(data_dir / f"{n}.jpg") for n in ("obama", "biden", "astronaut")}
    groups = [{"id": "oa", "refs": [refs["obama"], refs["astronaut"]], "prompt": PROMPT, "anchors": ["real/oa.png"]},
              {"id": "oba", "refs": list(refs.values()), "prompt": PROMPT, "anchors": ["real/oba.png"]}]
    (t / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    (t / "gen.py").write_text(GENERATOR.format(data=data_dir.resolve()))
    write_tiny_clip(t / "clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=768)
    CLIPVisionModelWithProjection(cfg).save_pretrained(t / "aes" / "clip")
    torch.save(AestheticMLP().state_dict(), t / "aes" / "sac+logos+ava1-l14-linearMSE.pth")
    args = build_args(t, t / "out")
    assert make_pairs.main(args) == 0
    return t


def build_args(t: Path, out: Path, seeds: str = "[0,1]") -> list[str]:
    return ["build", "--groups", str(t / "groups.jsonl"), "--out", str(out), "--generator", f"{t / 'gen.py'}:generate",
            "--clip-dir", str(t / "clip"), "--aesthetic-dir", str(t / "aes"), "--backend", "dlib", "--quiet",
            "--set", f"seeds={seeds}", "--set", "perturbations=[{kind: noise, strength: 0.2}, "
            "{kind: saturation, strength: 0.35}]", "--set", "thresholds=" + json.dumps(TAU)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_build_scores_pairs_and_filters_by_eq9(work):
    out = work / "out"
    cands = {(c["group"], c["id"]): c for c in jsonl(out / "candidates.jsonl")}
    # per group: 1 anchor + 2 generations + 2 perturbations of each of (anchor, best generation = seed0)
    ids = ["real0", "seed0", "seed1", "real0__noise0.2-s0", "real0__saturation0.35-s1", "seed0__noise0.2-s0",
           "seed0__saturation0.35-s1"]
    assert sorted(cands) == sorted((g, i) for g in ("oa", "oba") for i in ids)
    assert all(set(METRICS) <= set(c["phi"]) and c["phi"]["sem"] is not None for c in cands.values())
    for g in ("oa", "oba"):  # the wrong person costs identity
        assert cands[g, "seed1"]["phi"]["id"] < cands[g, "seed0"]["phi"]["id"] - 0.05
    assert cands["oba", "real0"]["phi"]["n_faces"] == 3
    raw = {p["pair_id"]: p for p in jsonl(out / "pairs_raw.jsonl")}
    assert len(raw) == 18  # per group 6 anchor + 1 best_worst + 2 parent (anchor>own perturbations proposed once)
    for p in raw.values():  # Eq. 8 and Eq. 9 recomputed from the candidates' scores
        w, l = cands[p["group"], p["pair_id"].split(":")[1].split(">")[0]], cands[p["group"], p["pair_id"].split(">")[1]]
        for m in METRICS:
            assert p["delta"][m] == pytest.approx(w["phi"][m] - l["phi"][m], abs=1e-9)
        assert p["passed"] == [m for m in METRICS if p["delta"][m] > TAU[m]]
        assert p["kept"] == bool(p["passed"])
        assert len(p["refs"]) == (2 if p["group"] == "oa" else 3) and p["prompt"] == PROMPT
    for g in ("oa", "oba"):
        assert raw[f"{g}:seed0>seed1"]["policy"] == "best_worst"
        for pid in ("real0>seed1", "real0>real0__noise0.2-s0", "seed0>seed1"):
            assert "id" in raw[f"{g}:{pid}"]["passed"], (g, pid)
        for pid in ("real0>seed0", "real0>real0__saturation0.35-s1"):  # same people, same identity
            assert "id" not in raw[f"{g}:{pid}"]["passed"], (g, pid)
    kept = jsonl(out / "pairs.jsonl")
    assert [p["pair_id"] for p in kept] == [p for p in raw if raw[p]["kept"]] and 0 < len(kept) < len(raw)
    assert (work / "calls.txt").read_text().split() == ["0", "1", "0", "1"]


def test_perturbations_are_recorded_and_reproducible(work):
    out = work / "out"
    cands = {c["id"]: c for c in jsonl(out / "candidates.jsonl")}
    for c in (c for c in cands.values() if c["source"] == "perturbed"):
        p = Perturbation(**c["params"])
        parent = load_image(out / cands[c["parent"]]["image"])
        assert np.array_equal(p.apply(parent), load_image(out / c["image"])), c["id"]


def test_review_page_and_decisions_give_the_dpo_manifest(work):
    out = work / "out"
    html_path = work / "review" / "review.html"
    assert make_pairs.main(["review", "--pairs", str(out / "pairs.jsonl"), "--out", str(html_path)]) == 0
    page = html_path.read_text()
    kept = jsonl(out / "pairs.jsonl")
    assert all(f'data-pair="{p["pair_id"]}"'.replace(">", "&gt;") in page for p in kept)
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == sum(len(p["refs"]) + 2 for p in kept)  # refs + chosen + rejected per pair
    assert all(not s.startswith(("/", "http")) and (html_path.parent / s).is_file() for s in srcs)
    assert "<link" not in page and "<script src" not in page and "Download decisions" in page
    decisions = {p["pair_id"]: "accept" for p in kept}
    decisions[kept[0]["pair_id"]] = "reject"
    (work / "decisions.json").write_text(json.dumps({"decisions": decisions}))
    manifest = work / "final" / "dpo.jsonl"
    assert make_pairs.main(["apply", "--pairs", str(out / "pairs.jsonl"), "--decisions",
                            str(work / "decisions.json"), "--out", str(manifest), "--require-all"]) == 0
    rows = jsonl(manifest)
    assert [r["pair_id"] for r in rows] == [p["pair_id"] for p in kept[1:]]
    for r in rows:
        assert r["task"] == "group" and r["prompt"] == PROMPT and r["passed"]
        for f in (r["chosen"], r["rejected"], *r["refs"]):  # relative to the manifest's folder, loadable
            assert not Path(f).is_absolute() and load_image(manifest.parent / f).ndim == 3
        assert r["delta"]["id"] == pytest.approx(r["phi_chosen"]["id"] - r["phi_rejected"]["id"])
    (work / "partial.csv").write_text(f"pair_id,decision\n{kept[0]['pair_id']},accept\n")
    with pytest.raises(ManifestError, match="no decision"):
        from idglow_core.preference import apply_decisions
        apply_decisions(out / "pairs.jsonl", work / "partial.csv", work / "x.jsonl", require_all=True)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the page's inline JS is not run")
def test_page_script_downloads_decisions_that_apply_reads(work, tmp_path):
    from idglow_core.preference import read_decisions, write_review_page

    page = write_review_page(work / "out" / "pairs.jsonl", tmp_path / "review.html").read_text()
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    ids = [p["pair_id"] for p in jsonl(work / "out" / "pairs.jsonl")]
    stub = ("const ids = %s; let saved = null;\n"  # a DOM stand-in: the first pair is switched to reject
            "global.document = {querySelectorAll: () => ids.map((id, i) => ({dataset: {pair: id}, "
            "querySelector: () => ({value: i === 0 ? 'reject' : 'accept'})})), createElement: () => ({click() {}})};\n"
            "global.Blob = class { constructor(parts) { saved = parts.join(''); } };\n"
            "global.URL = {createObjectURL: () => 'blob:x'};\n" % json.dumps(ids))
    js = tmp_path / "run.js"
    js.write_text(stub + script + "\ndownload(); require('fs').writeFileSync(process.argv[2], saved);\n")
    subprocess.run(["node", str(js), str(tmp_path / "decisions.json")], check=True, timeout=60)
    got = read_decisions(tmp_path / "decisions.json", ids)
    assert got == {pid: i != 0 for i, pid in enumerate(ids)}


def test_rerun_scores_and_generates_nothing_already_done(work, monkeypatch):
    out = work / "rerun"
    shutil.copytree(work / "out", out)
    before = (out / "pairs.jsonl").read_text()
    calls = {"score": 0, "references": 0}
    orig_score, orig_refs = MetricSuite.score, MetricSuite.references

    def score(self, *a, **k):
        calls["score"] += 1
        return orig_score(self, *a, **k)

    def references(self, *a, **k):
        calls["references"] += 1
        return orig_refs(self, *a, **k)

    monkeypatch.setattr(MetricSuite, "score", score)
    monkeypatch.setattr(MetricSuite, "references", references)
    assert make_pairs.main(build_args(work, out)) == 0
    assert calls == {"score": 0, "references": 0} and (out / "pairs.jsonl").read_text() == before
    assert (work / "calls.txt").read_text().split() == ["0", "1", "0", "1"]  # no image regenerated
    assert make_pairs.main(build_args(work, out, seeds="[0,1,2]")) == 0  # one more seed: only it is new
    assert calls == {"score": 2, "references": 2}  # one new image and one reference analysis per group
    assert (work / "calls.txt").read_text().split() == ["0", "1", "0", "1", "2", "2"]


def test_bad_inputs_raise_typed_errors(tmp_path, capsys):
    blank = tmp_path / "blank.png"
    save_image_atomic(np.full((64, 64, 3), 90, np.uint8), blank)
    (tmp_path / "g.jsonl").write_text(json.dumps({"id": "nf", "refs": [str(blank)], "anchors": [str(blank)]}) + "\n")
    suite = MetricSuite(load_analyzer("dlib"))
    with pytest.raises(ManifestError, match=r"group 'nf' \(line 1\).*No face"):
        build_pairs(tmp_path / "g.jsonl", tmp_path / "o", suite, PairsConfig(perturbations=[]), progress=False)
    (tmp_path / "g2.jsonl").write_text(json.dumps({"id": "e", "refs": [str(blank)]}) + "\n")
    with pytest.raises(ManifestError, match="no candidates"):
        build_pairs(tmp_path / "g2.jsonl", tmp_path / "o", suite, PairsConfig(), progress=False)
    with pytest.raises(InputError, match="not an image"):
        build_pairs(tmp_path / "g2.jsonl", tmp_path / "o", suite, PairsConfig(seeds=[0]),
                    generate=lambda refs, prompt, seed: np.zeros((2, 2, 7)), progress=False)
    base = ["build", "--groups", str(tmp_path / "g2.jsonl"), "--out", str(tmp_path / "o"), "--backend", "dlib"]
    for extra, msg in ((["--generator", "nosuchfile.py:generate"], "does not exist"),
                       (["--model", str(tmp_path)], "go together"),
                       (["--generator", "gen.py:generate", "--model", "m", "--adapter", "a"], "not both")):
        assert make_pairs.main(base + extra) == 2  # typed error -> message on stderr, exit code 2
        assert msg in capsys.readouterr().err
