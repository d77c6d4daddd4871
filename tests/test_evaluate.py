"""Batch evaluation and the facesim / evaluate commands, on real faces with the dlib backend."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idglow_core.cli import main as cli_main
from idglow_core.errors import ManifestError
from idglow_core.evaluate import evaluate_manifest, format_tables, read_manifest, summarise
from idglow_core.faces import load_analyzer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "demo" / "group_set" / "manifest.jsonl"


@pytest.fixture(scope="module")
def dlib_analyzer():
    return load_analyzer("dlib")


def side_by_side(paths, out):
    imgs = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(i.width for i in imgs), max(i.height for i in imgs)), (240, 240, 240))
    x = 0
    for i in imgs:
        canvas.paste(i, (x, 0))
        x += i.width
    canvas.save(out)
    return out


def test_example_set_gives_the_known_assignments(dlib_analyzer, tmp_path):
    summary = evaluate_manifest(EXAMPLE, tmp_path, dlib_analyzer, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        for got, want in zip(r["assignment"], r["expected_assignment"]):
            if want is not None:
                assert got == want, r
    t = summary["group"]
    right, missing, impostor = (t["composite (right people)"], t["composite (one missing)"], t["composite (impostor)"])
    for mode in ("static", "dynamic"):
        assert right[mode]["fs"] > impostor[mode]["fs"] > missing[mode]["fs"]
        assert right[mode]["count_ok"] == 1.0 and missing[mode]["count_ok"] == 0.0
    md = (tmp_path / "summary.md").read_text()
    assert "| composite (right people) |" in md and "Static FS" in md and "Dynamic FS" in md
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_summary_means_are_per_method_and_mode():
    results = [
        {"task": "group", "method": "A", "prompt_mode": "static", "facesim_strict": 0.5, "facesim_matched": 0.5,
         "count_ok": True, "aesthetic": 5.0},
        {"task": "group", "method": "A", "prompt_mode": "static", "facesim_strict": 0.3, "facesim_matched": None,
         "count_ok": False, "aesthetic": 6.0},
        {"task": "age", "method": "A", "prompt_mode": "dynamic", "facesim_strict": 0.2, "facesim_matched": 0.4,
         "count_ok": True, "aesthetic": 7.0},
    ]
    s = summarise(results)
    cell = s["group"]["A"]["static"]
    assert cell["fs"] == pytest.approx(0.4) and cell["fs_matched"] == pytest.approx(0.5)
    assert cell["aes"] == pytest.approx(5.5) and cell["count_ok"] == pytest.approx(0.5) and cell["n"] == 2
    md = format_tables(s)
    assert "Task 1 (direct group fusion)" in md and "Task 2 (age-transformed group)" in md
    assert "| A | 0.40 | 0.50 | 5.50 | 0.50 | 2 |" in md


def test_manifest_problems_are_all_reported_with_line_numbers(tmp_path):
    shutil.copy(ROOT / "tests" / "data" / "obama.jpg", tmp_path / "a.jpg")
    lines = [
        json.dumps({"refs": ["a.jpg"], "image": "a.jpg"}),
        "{not json",
        json.dumps({"refs": ["missing_ref.jpg"], "image": "missing.png"}),
        json.dumps({"refs": [], "image": "a.jpg", "task": "video"}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path / "m.jsonl")
    msg = str(err.value)
    assert "line 2: not valid JSON" in msg
    assert "line 3: file not found" in msg and "missing_ref.jpg" in msg and "missing.png" in msg
    assert "line 4:" in msg and "'refs'" in msg and "'task'" in msg
    assert "line 1" not in msg


def test_empty_manifest_and_faceless_reference(tmp_path, dlib_analyzer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no samples"):
        read_manifest(tmp_path / "empty.jsonl")
    Image.new("RGB", (120, 120), (128, 128, 128)).save(tmp_path / "grey.png")
    shutil.copy(ROOT / "tests" / "data" / "obama.jpg", tmp_path / "o.jpg")
    (tmp_path / "m.jsonl").write_text(json.dumps({"refs": ["o.jpg", "grey.png"], "image": "o.jpg"}) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: .*grey.png.*No face"):
        evaluate_manifest(tmp_path / "m.jsonl", tmp_path / "out", dlib_analyzer, progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()  # nothing half-written


def test_facesim_command_on_biden_left_obama_right(tmp_path, data_dir, capsys):
    img = side_by_side([data_dir / "biden.jpg", data_dir / "obama2.jpg"], tmp_path / "g.png")
    rc = cli_main(["facesim", "--refs", str(data_dir / "obama.jpg"), str(data_dir / "biden.jpg"),
                   "--image", str(img), "--backend", "dlib", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"faces", "assignment", "similarity", "facesim_strict", "facesim_matched", "count_ok",
                        "confusion", "id_conf", "id_conf_mean"}
    assert out["assignment"] == [1, 0] and out["count_ok"] is True
    assert len(out["faces"]) == 2 and out["faces"][0][0] < out["faces"][1][0]
    assert out["facesim_strict"] == pytest.approx(np.mean(out["similarity"]))


def test_three_references_on_two_faces(tmp_path, data_dir, capsys):
    img = side_by_side([data_dir / "biden.jpg", data_dir / "obama2.jpg"], tmp_path / "g.png")
    refs = [data_dir / "obama.jpg", data_dir / "biden.jpg", data_dir / "astronaut.jpg"]
    rc = cli_main(["facesim", "--refs", *map(str, refs), "--image", str(img), "--backend", "dlib", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["assignment"].count(-1) == 1 and out["assignment"][2] == -1
    assert out["facesim_strict"] == pytest.approx(sum(out["similarity"]) / 3)
    assert out["similarity"][2] == 0.0 and out["count_ok"] is False


def test_facesim_command_names_the_faceless_reference(tmp_path, data_dir, capsys):
    Image.new("RGB", (100, 100), (90, 90, 90)).save(tmp_path / "flat.png")
    rc = cli_main(["facesim", "--refs", str(data_dir / "obama.jpg"), str(tmp_path / "flat.png"),
                   "--image", str(data_dir / "obama2.jpg"), "--backend", "dlib"])
    assert rc == 2
    assert "reference image 2 of 2" in capsys.readouterr().err


def test_evaluate_command_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "idglow_core", "evaluate", "--manifest", str(EXAMPLE),
                           "--out", str(tmp_path), "--backend", "dlib"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| composite (impostor) |" in proc.stdout
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "summary.md").is_file()
