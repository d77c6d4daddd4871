"""The benchmark: bench build on the test photos, the copy-paste measure and ID-Conf in the evaluate tables,
resumable sharded runs, and IdGlowPipeline as a method (tiny offline stack)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idglow_core.bench.build import BenchConfig, build_bench, draw_sets
from idglow_core.bench.copypaste import angle, copy_paste, copy_paste_scores
from idglow_core.bench.run import RowSkipped, read_bench, run_bench, shard, write_manifests
from idglow_core.cli import main as cli_main
from idglow_core.errors import ConfigError, InputError, ManifestError
from idglow_core.evaluate import evaluate_manifest, format_tables, summarise
from idglow_core.prompting.templates import static_prompt


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def identities(tmp_path, data_dir) -> Path:
    """obama/ (3 photos), biden.jpg, astronaut.jpg: three identities, CelebA-HQ style."""
    root = tmp_path / "identities"
    (root / "obama").mkdir(parents=True)
    for name in ("obama", "obama2", "obama3"):
        shutil.copy(data_dir / f"{name}.jpg", root / "obama" / f"{name}.jpg")
    for name in ("biden", "astronaut"):
        shutil.copy(data_dir / f"{name}.jpg", root / f"{name}.jpg")
    return root


# ---- copy-paste (MultiID-Bench) against hand values ----

def test_copy_paste_hand_values():
    r, t = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    g30 = np.array([[np.cos(np.pi / 6), np.sin(np.pi / 6)]])      # 30 deg from r, 60 deg from t
    assert copy_paste(g30, t, r)[0] == pytest.approx((60 - 30) / 90)
    assert copy_paste(r, t, r)[0] == pytest.approx(1.0)           # the reference pasted
    assert copy_paste(t, t, r)[0] == pytest.approx(-1.0)          # the ground truth itself
    g = np.array([[1.0, 1.0]])                                    # half-way: 45 - 45
    assert copy_paste(g, t, r)[0] == pytest.approx(0.0)
    assert np.isnan(copy_paste(g, r, r)[0])                       # theta(t, r) = 0: undefined
    assert angle([[1.0, 0.0]], [[-1.0, 0.0]])[0] == pytest.approx(np.pi)
    # per reference through the Hungarian assignments: ref 0 -> gen 1 / target 0; ref 1 unmatched in gen
    cp = copy_paste_scores(np.vstack([r, t]), np.vstack([t, g30]), [1, -1], np.vstack([t, r]), [0, 1])
    assert cp[0] == pytest.approx(1 / 3) and np.isnan(cp[1])
    with pytest.raises(InputError):
        angle(np.zeros((2, 3)), np.zeros((1, 3)))


def test_summary_and_tables_carry_id_conf_and_copy_paste():
    base = {"task": "group", "method": "A", "prompt_mode": "static", "facesim_strict": 0.5,
            "facesim_matched": 0.5, "count_ok": True}
    results = [{**base, "id_conf_mean": 0.25, "copy_paste_mean": 0.5},
               {**base, "id_conf_mean": 0.75, "copy_paste_mean": None},
               {**base, "method": "B", "id_conf_mean": None}]
    s = summarise(results)["group"]
    assert s["A"]["static"]["id_conf"] == pytest.approx(0.5)
    assert s["A"]["static"]["copy_paste"] == pytest.approx(0.5)    # rows without a ground truth left out
    assert s["B"]["static"]["copy_paste"] is None and np.isnan(s["B"]["static"]["id_conf"])
    md = format_tables(summarise(results))
    assert "Static ID-Conf" in md and "Static CP" in md
    assert "| A | 0.50 | 0.50 | 0.50 | 0.50 | 1.00 | 2 |" in md
    no_gt = format_tables(summarise(results[2:]))
    assert "ID-Conf" in no_gt and "Static CP" not in no_gt          # CP only where some row has ground truth


def test_evaluate_computes_copy_paste_against_the_ground_truth_photo(tmp_path, data_dir):
    """Obama: reference obama2, ground truth obama. Generated = obama2 (a pasted reference) -> +1, = obama (the
    ground truth) -> -1, = obama3 -> the value worked out from the three embeddings by hand."""
    from idglow_core.faces import load_analyzer
    from idglow_core.images import load_image

    analyzer = load_analyzer("dlib")
    for name in ("obama", "obama2", "obama3"):
        shutil.copy(data_dir / f"{name}.jpg", tmp_path / f"{name}.jpg")
    rows = [{"refs": ["obama2.jpg"], "image": f"{g}.jpg", "target": "obama.jpg", "method": g}
            for g in ("obama2", "obama", "obama3")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = evaluate_manifest(tmp_path / "m.jsonl", tmp_path / "eval", analyzer, progress=False)
    got = {r["method"]: r for r in _rows(tmp_path / "eval" / "results.jsonl")}
    assert got["obama2"]["copy_paste_mean"] == pytest.approx(1.0, abs=1e-6)
    assert got["obama"]["copy_paste_mean"] == pytest.approx(-1.0, abs=1e-6)
    e = {n: analyzer.analyze(load_image(tmp_path / f"{n}.jpg"))[0].embedding.astype(np.float64)
         for n in ("obama", "obama2", "obama3")}
    th = lambda a, b: np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))  # noqa: E731
    want = (th(e["obama3"], e["obama"]) - th(e["obama3"], e["obama2"])) / th(e["obama"], e["obama2"])
    assert got["obama3"]["copy_paste_mean"] == pytest.approx(want, abs=1e-6)
    assert -1 < want < 1
    assert got["obama3"]["id_conf_mean"] == pytest.approx(1.0)       # one face: top2 = 0
    assert summary["group"]["obama2"]["static"]["copy_paste"] == pytest.approx(1.0, abs=1e-6)
    assert "CP" in (tmp_path / "eval" / "summary.md").read_text()
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "target": "absent.jpg"}) + "\n")
    with pytest.raises(ManifestError, match="line 1: ground-truth"):
        evaluate_manifest(tmp_path / "bad.jsonl", tmp_path / "eval2", analyzer, progress=False)


# ---- bench build ----

def test_bench_build_configurations_seeds_and_shared_identity_sets(identities, tmp_path):
    info = build_bench(identities, tmp_path / "b", BenchConfig(ks=(2, 3), sets_per_k=2, seed=0))
    rows = _rows(tmp_path / "b" / "bench.jsonl")
    assert info["rows"] == len(rows) == (2 + 1) * 2                # k=2: 2 sets, k=3: the only 3-set; 2 tasks
    assert info["prompt_modes"] == ["static"] and "no VLM" in info["dynamic"]
    assert {r["prompt_mode"] for r in rows} == {"static"}
    for r in rows:
        assert len(r["refs"]) == len(r["identities"]) == r["k"] == len(set(r["identities"]))
        assert r["prompt"] == static_prompt(r["task"], r["k"])
        assert all((tmp_path / "b" / p).is_file() for p in r["refs"])
        assert [Path(p).stem for p in r["refs"]] == r["identities"]
    by_set: dict = {}
    for r in rows:
        by_set.setdefault(r["set"], {})[r["task"]] = r
    assert len(by_set) == 3
    for set_id, tasks in by_set.items():                           # Task 1 and Task 2 share each identity set
        assert set(tasks) == {"group", "age"}
        assert tasks["group"]["identities"] == tasks["age"]["identities"]
        assert tasks["group"]["refs"] == tasks["age"]["refs"] and tasks["group"]["seed"] == tasks["age"]["seed"]
    k2 = [tuple(r["identities"]) for r in rows if r["k"] == 2 and r["task"] == "group"]
    assert len({frozenset(s) for s in k2}) == 2                     # distinct sets
    again = build_bench(identities, tmp_path / "b2", BenchConfig(ks=(2, 3), sets_per_k=2, seed=0))
    assert _rows(tmp_path / "b2" / "bench.jsonl") == rows and again["sets"] == info["sets"]   # seeded
    assert read_bench(tmp_path / "b" / "bench.jsonl")[0].refs[0].is_file()


def test_draw_sets_is_seeded_per_k_and_distinct():
    names = [f"p{i}" for i in range(12)]
    a = draw_sets(names, 2, 10, seed=0)
    assert a == draw_sets(names, 2, 10, seed=0)
    assert len({frozenset(s) for s in a}) == 10
    assert any(draw_sets(names, 2, 10, seed=s) != a for s in (1, 2, 3))
    assert len(draw_sets(names, 3, 1000, seed=0)) == 220             # capped at C(12, 3)
    with pytest.raises(ConfigError):
        BenchConfig(ks=(0,))


def test_bench_build_skips_faceless_identities_and_writes_dynamic_prompts(identities, tmp_path):
    from idglow_core.faces import load_analyzer
    from idglow_core.prompting.enricher import EnrichConfig
    from idglow_core.prompting.testing import build_tiny_vlm

    Image.new("RGB", (120, 120), (128, 128, 128)).save(identities / "nobody.png")
    info = build_bench(identities, tmp_path / "b", BenchConfig(ks=(2,), sets_per_k=1, seed=3, tasks=("age",)),
                       analyzer=load_analyzer("dlib"), vlm=build_tiny_vlm(),
                       enrich_config=EnrichConfig(max_new_tokens=8, retry=False, max_image_pixels=56 * 56))
    assert info["skipped_identities"] == {"nobody": "nobody.png: no face found"}
    rows = _rows(tmp_path / "b" / "bench.jsonl")
    assert [r["prompt_mode"] for r in rows] == ["static", "dynamic"]
    dyn = rows[1]
    assert dyn["identities"] == rows[0]["identities"] and "nobody" not in dyn["identities"]
    assert dyn["prompt_source"] in ("vlm", "vlm_retry", "static")   # a random tiny VLM fails validation
    assert info["dynamic"] == "enricher"


def test_bench_build_command(identities, tmp_path, capsys):
    rc = cli_main(["bench", "build", "--identities", str(identities), "--out", str(tmp_path / "b"), "--k", "2",
                   "--sets", "3", "--tasks", "group"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 3
    assert cli_main(["bench", "build", "--identities", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2


# ---- bench run: resume, shards, manifests ----

class PasteMethod:
    """A weight-free method: the references side by side (what the ComfyUI test does over HTTP)."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def generate(self, row, out_path):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # a killed run
        if len(row.refs) == 3:
            raise RowSkipped("no 3-person variant")
        self.calls.append(row.id)
        imgs = [Image.open(r).convert("RGB") for r in row.refs]
        canvas = Image.new("RGB", (sum(i.width for i in imgs), max(i.height for i in imgs)), "white")
        x = 0
        for i in imgs:
            canvas.paste(i, (x, 0))
            x += i.width
        canvas.save(out_path)


def test_bench_run_resumes_shards_and_writes_the_evaluate_manifest(identities, tmp_path):
    from idglow_core.faces import load_analyzer

    build_bench(identities, tmp_path / "b", BenchConfig(ks=(2, 3), sets_per_k=3, seed=0))
    bench = tmp_path / "b" / "bench.jsonl"
    rows = read_bench(bench)
    assert [r.id for r in shard(rows, 1, 3)] == [r.id for r in rows[1::3]]
    with pytest.raises(InputError):
        shard(rows, 3, 3)
    killed = PasteMethod(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench, killed, "paste", progress=False)
    assert len(killed.calls) == 2
    resumed = PasteMethod()
    results = [run_bench(bench, resumed, "paste", rank=r, world=2, progress=False) for r in (0, 1)]
    assert sum(x.existing for x in results) == 2                      # the killed run's images are kept
    assert not set(resumed.calls) & set(killed.calls)
    assert sum(x.done for x in results) == 4 and sum(len(x.skipped) for x in results) == 2  # the k=3 rows
    manifest, n = write_manifests(bench, "paste")
    assert n == 6 and manifest == tmp_path / "b" / "runs" / "paste" / "manifest.jsonl"
    summary = evaluate_manifest(tmp_path / "b" / "generated.jsonl", tmp_path / "eval", load_analyzer("dlib"),
                                progress=False)
    for task in ("group", "age"):
        cell = summary[task]["paste"]["static"]
        assert cell["n"] == 3 and cell["count_ok"] == 1.0 and cell["fs"] > 0.99 and cell["id_conf"] > 0.05


# ---- IdGlowPipeline as a method ----

def test_pipeline_method_passes_options_through_and_refuses_unknown_ones(identities, tmp_path):
    from idglow_core.adapter import IdGlowAdapter
    from idglow_core.bench.pipeline_method import PipelineMethod, parse_pipeline_args
    from idglow_core.pipeline import IdGlowPipeline
    from idglow_core.testing import OneFaceAnalyzer, small_edit_images, tiny_edit_pipeline

    opts = parse_pipeline_args(["steps=2", "height=32", "width=32", "true_cfg_scale=1", "schedule=gate(lo=0.3,hi=0.6)",
                                "negative_prompt=null"], adapter=True)
    assert opts == {"steps": 2, "height": 32, "width": 32, "true_cfg_scale": 1, "schedule": "gate(lo=0.3,hi=0.6)",
                    "negative_prompt": None}
    with pytest.raises(InputError, match="seed"):
        parse_pipeline_args(["seed=3"], adapter=True)                # the row's own seed wins
    with pytest.raises(InputError, match="base pipeline"):
        parse_pipeline_args(["weight=0.5"], adapter=False)
    build_bench(identities, tmp_path / "b", BenchConfig(ks=(2,), sets_per_k=1, seed=0))
    bench = tmp_path / "b" / "bench.jsonl"
    with small_edit_images():
        base = tiny_edit_pipeline()
        adapter = IdGlowAdapter.init_for(base.transformer, id_dim=8)
        method = PipelineMethod(pipe=IdGlowPipeline(base, adapter, analyzer=OneFaceAnalyzer()), options=opts)
        res = run_bench(bench, method, "IdGlow tiny", progress=False)
        plain = PipelineMethod(base=base, options={k: opts[k] for k in ("steps", "height", "width",
                                                                         "true_cfg_scale")})
        res_base = run_bench(bench, plain, "base tiny", progress=False)
    assert res.done == res_base.done == 2 and not res.failed
    img = tmp_path / "b" / "runs" / "IdGlow_tiny" / "images" / "k2-s000-group-static.png"
    assert Image.open(img).size == (32, 32)
    with pytest.raises(InputError):
        PipelineMethod()


def test_bench_from_sft_rows_carries_the_ground_truth_into_the_copy_paste_measure(tmp_path, data_dir):
    """An SFT row (target = obama3 | biden, refs = obama2 and a mirrored biden): the paste method copies the
    references: copy-paste is +1 for Obama (obama2 pasted; the truth is another shot) and well above 0 for Biden
    (measured 0.71: his mirrored reference is nearly the target's own shot, so theta(t, r) is small)."""
    from idglow_core.bench.build import build_bench_from_sft
    from idglow_core.faces import load_analyzer

    sft = tmp_path / "sft"
    sft.mkdir()
    shutil.copy(data_dir / "obama2.jpg", sft / "obama2.jpg")
    Image.open(data_dir / "biden.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(sft / "biden_m.jpg")
    PasteMethod().generate(type("R", (), {"refs": (data_dir / "obama3.jpg", data_dir / "biden.jpg"), "id": "t"}),
                           sft / "group.jpg")
    (sft / "val.jsonl").write_text(json.dumps({"target": "group.jpg", "refs": ["obama2.jpg", "biden_m.jpg"],
                                               "row_id": "group.jpg", "identities": ["obama", "biden"]}) + "\n")
    info = build_bench_from_sft(sft / "val.jsonl", tmp_path / "b")
    assert info["rows"] == 1 and info["ground_truth"]
    row = _rows(tmp_path / "b" / "bench.jsonl")[0]
    assert row["task"] == "group" and row["k"] == 2 and (tmp_path / "b" / row["target"]).is_file()
    run_bench(tmp_path / "b" / "bench.jsonl", PasteMethod(), "paste", progress=False)
    write_manifests(tmp_path / "b" / "bench.jsonl", "paste")
    evaluate_manifest(tmp_path / "b" / "generated.jsonl", tmp_path / "eval", load_analyzer("dlib"), progress=False)
    res = _rows(tmp_path / "eval" / "results.jsonl")[0]
    assert res["target_faces"] == 2
    assert res["copy_paste"][0] == pytest.approx(1.0, abs=0.02) and res["copy_paste"][1] > 0.5
    (sft / "bad.jsonl").write_text(json.dumps({"target": "absent.jpg", "refs": ["obama2.jpg"]}) + "\n")
    with pytest.raises(ManifestError, match="not found"):
        build_bench_from_sft(sft / "bad.jsonl", tmp_path / "b2")


@pytest.mark.slow
def test_bench_run_command_loads_the_pipeline_from_folders_with_and_without_an_adapter(identities, tmp_path):
    """``bench run --model DIR [--adapter F]`` on the tiny saved stack; faces of the references come from dlib
    (the adapter is built for dlib's 128-d embeddings)."""
    from idglow_core.adapter import IdGlowAdapter
    from idglow_core.testing import save_tiny_pipeline, small_edit_images, tiny_edit_pipeline

    build_bench(identities, tmp_path / "b", BenchConfig(ks=(2,), sets_per_k=1, seed=0, tasks=("age",)))
    bench = str(tmp_path / "b" / "bench.jsonl")
    fast = ["--pipeline-arg", "steps=2", "--pipeline-arg", "height=32", "--pipeline-arg", "width=32",
            "--pipeline-arg", "true_cfg_scale=1"]
    with small_edit_images():
        pipe = tiny_edit_pipeline()
        model = save_tiny_pipeline(pipe, tmp_path / "model")
        adapter = IdGlowAdapter.init_for(pipe.transformer, id_dim=128).save(tmp_path / "idglow.safetensors")
        common = ["bench", "run", "--manifest", bench, "--model", str(model), "--device", "cpu", *fast]
        assert cli_main([*common, "--method", "IdGlow", "--adapter", str(adapter), "--face-backend", "dlib"]) == 0
        assert cli_main([*common, "--method", "base"]) == 0
        assert cli_main([*common, "--method", "base", "--pipeline-arg", "weight=0.5"]) == 2  # adapter-only option
    for method in ("IdGlow", "base"):
        img = tmp_path / "b" / "runs" / method / "images" / "k2-s000-age-static.png"
        assert Image.open(img).size == (32, 32)
    listed = _rows(tmp_path / "b" / "generated.jsonl")
    assert sorted(r["method"] for r in listed) == ["IdGlow", "base"]
    assert all((tmp_path / "b" / r["image"]).is_file() and r["task"] == "age" for r in listed)
