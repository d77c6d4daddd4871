"""A ComfyUI workflow as a benchmark method, over a real ComfyUI server's HTTP API.

The "method" is a graph of core image nodes only (LoadImage x k -> ImageStitch -> SaveImage): it puts the
reference portraits side by side, so it needs no model weights and its FaceSim is known: the references' own
faces (strict FaceSim ~1, above dlib's same-person threshold). With the references swapped to other people the
score drops. A run killed half-way resumes. Needs COMFYUI_DIR (skipped with the reason printed otherwise).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_helpers import comfy_dir_or_skip
from comfy_server import ComfyServer
from idglow_core.bench.build import BenchConfig, build_bench
from idglow_core.bench.comfy import ComfyMethod, read_mapping
from idglow_core.bench.run import BenchRow, RowSkipped
from idglow_core.cli import main as cli_main
from idglow_core.errors import ConfigError
from idglow_core.evaluate import evaluate_manifest
from idglow_core.faces import DLIB_SAME_PERSON_COSINE, load_analyzer

REPO = Path(__file__).resolve().parents[1]
STITCH = {"direction": "right", "match_image_size": False, "spacing_width": 0, "spacing_color": "white"}


def _stitch_workflow(k: int) -> dict:
    """LoadImage nodes "1".."k" -> a chain of ImageStitch -> SaveImage "out"."""
    graph = {str(i): {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}} for i in range(1, k + 1)}
    last = ["1", 0]
    for i in range(2, k + 1):
        graph[f"s{i}"] = {"class_type": "ImageStitch", "inputs": {"image1": last, "image2": [str(i), 0], **STITCH}}
        last = [f"s{i}", 0]
    graph["out"] = {"class_type": "SaveImage", "inputs": {"images": last, "filename_prefix": "bench"}}
    return graph


def _write_mapping(folder: Path, ks=(2, 3)) -> Path:
    variants = []
    for k in ks:
        (folder / f"stitch{k}.json").write_text(json.dumps(_stitch_workflow(k)))
        variants.append({"workflow": f"stitch{k}.json", "refs": [str(i) for i in range(1, k + 1)], "output": "out"})
    path = folder / "map.json"
    path.write_text(json.dumps({"variants": variants}))
    return path


class FakeClient:
    def upload(self, path):
        return f"up_{path.name}"


def test_mapping_fills_refs_prompt_and_seed_and_checks_the_file(tmp_path):
    graph = {**_stitch_workflow(2), "p": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
             "k": {"class_type": "KSampler", "inputs": {"seed": 0}}}
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    (tmp_path / "map.yaml").write_text("workflow: wf.json\nrefs: ['2', '1']\noutput: out\n"
                                       "prompt: {node: p, input: text}\nseed: {node: k, input: seed}\n")
    method = ComfyMethod(FakeClient(), read_mapping(tmp_path / "map.yaml"), name="m")
    row = BenchRow("r1", (tmp_path / "a.jpg", tmp_path / "b.jpg"), "group", "static", "two people", 7)
    g, _ = method.graph_for(row)
    assert g["2"]["inputs"]["image"] == "up_a.jpg" and g["1"]["inputs"]["image"] == "up_b.jpg"
    assert g["p"]["inputs"]["text"] == "two people" and g["k"]["inputs"]["seed"] == 7
    assert g["out"]["inputs"]["filename_prefix"] == "idglow_bench/m/r1"
    with pytest.raises(RowSkipped, match="k = 3"):
        method.graph_for(BenchRow("r2", (tmp_path / "a.jpg",) * 3, "group", "static", "", 0))
    (tmp_path / "bad.yaml").write_text("workflow: wf.json\nrefs: ['p']\noutput: out\n")
    with pytest.raises(ConfigError, match="not LoadImage"):
        read_mapping(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("workflow: wf.json\nrefs: ['1']\noutput: nowhere\n")
    with pytest.raises(ConfigError, match="output"):
        read_mapping(tmp_path / "bad2.yaml")


@pytest.fixture(scope="module")
def comfy_url(tmp_path_factory):
    """A real ComfyUI with core nodes only (no pack: the 'method' needs no IdGlow node)."""
    with ComfyServer(comfy_dir_or_skip(), base=tmp_path_factory.mktemp("comfy_base"), with_pack=False) as server:
        yield server.url


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "idglow_core", "bench", "run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_stitch_workflow_over_http_scores_high_resumes_after_a_kill_and_swaps_score_lower(comfy_url, tmp_path,
                                                                                         data_dir, capsys):
    root = tmp_path / "identities"
    (root / "obama").mkdir(parents=True)
    shutil.copy(data_dir / "obama.jpg", root / "obama" / "obama.jpg")
    for name in ("biden", "astronaut"):
        shutil.copy(data_dir / f"{name}.jpg", root / f"{name}.jpg")
    build_bench(root, tmp_path / "b", BenchConfig(ks=(2, 3), sets_per_k=3, seed=0))
    bench = tmp_path / "b" / "bench.jsonl"
    rows = _rows(bench)
    assert len(rows) == (3 + 1) * 2
    mapping = _write_mapping(tmp_path)
    args = ["--manifest", str(bench), "--method", "stitch", "--comfy-url", comfy_url, "--workflow-map", str(mapping)]
    images = tmp_path / "b" / "runs" / "stitch" / "images"

    first = _cli(*args)                                          # killed as soon as its first image lands
    deadline = time.monotonic() + 60
    while not (images.is_dir() and any(images.glob("*.png"))) and first.poll() is None:
        assert time.monotonic() < deadline, "no image after 60 s"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(list(images.glob("*.png")))
    assert 1 <= done_before < len(rows), first.communicate()
    assert not list(images.glob(".*.tmp"))                       # atomic writes: no half image left
    assert cli_main(["bench", "run", *args]) == 0                 # the rerun (in-process: the same command)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["existing"] == done_before and report["done"] == len(rows) - done_before
    assert not report["skipped"] and not report["failed"]

    analyzer = load_analyzer("dlib")
    summary = evaluate_manifest(tmp_path / "b" / "generated.jsonl", tmp_path / "eval", analyzer, progress=False)
    for task in ("group", "age"):
        cell = summary[task]["stitch"]["static"]
        assert cell["n"] == 4 and cell["count_ok"] == 1.0
        assert cell["fs"] > DLIB_SAME_PERSON_COSINE                 # the references' own faces
    true_fs = summary["group"]["stitch"]["static"]["fs"]

    # The same workflow fed other people: each identity's portrait replaced by the next identity's.
    names = sorted({n for r in rows for n in r["identities"]})
    other = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}
    portrait = {n: p for r in rows for n, p in zip(r["identities"], r["refs"])}
    swapped_dir = tmp_path / "swapped"
    swapped_dir.mkdir()
    originals = [r for r in rows if r["task"] == "group" and r["k"] == 2]  # a 3-set of 3 people only reorders
    swapped = [{**r, "refs": [str(tmp_path / "b" / portrait[other[n]]) for n in r["identities"]]} for r in originals]
    (swapped_dir / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swapped))
    assert cli_main(["bench", "run", "--manifest", str(swapped_dir / "bench.jsonl"), "--method", "stitch-swapped",
                     "--comfy-url", comfy_url, "--workflow-map", str(mapping)]) == 0
    gen = {r["id"]: r for r in _rows(swapped_dir / "runs" / "stitch-swapped" / "manifest.jsonl")}
    eval_rows = [{"refs": [str(tmp_path / "b" / p) for p in r["refs"]], "task": "group", "method": "swapped",
                  "image": str(swapped_dir / "runs" / "stitch-swapped" / gen[r["id"]]["image"])} for r in originals]
    (swapped_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    low = evaluate_manifest(swapped_dir / "eval.jsonl", swapped_dir / "eval", analyzer, progress=False)
    assert len(eval_rows) == 3
    assert low["group"]["swapped"]["static"]["fs"] < true_fs - 0.03   # at most one of two people right
    assert low["group"]["swapped"]["static"]["fs"] < DLIB_SAME_PERSON_COSINE
