"""Evaluation that never loses or silently replaces work: output checks first, every bad input at once,
rows appended as computed, resume, Ctrl-C, each distinct image detected once, worker processes."""
import json
import os

import pytest
from PIL import Image

from idglow_core.cli import main as cli_main
from idglow_core.errors import ManifestError, OutputError
from idglow_core.evaluate import evaluate_manifest, format_tables, read_manifest, summarise
from idglow_core.testing import OneFaceAnalyzer


class CountingAnalyzer(OneFaceAnalyzer):
    """One face per image (embedding from the mean colour); counts calls; optionally Ctrl-C on call N."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = 0, interrupt_at

    def analyze(self, image):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().analyze(image)


def _png(path, colour):
    Image.new("RGB", (24, 24), colour).save(path)
    return path.name


def make_set(folder, n_images=4, lines_per_image=1, method="m"):
    """Two references, ``n_images`` generated images, each named by ``lines_per_image`` lines."""
    refs = [_png(folder / "ref_a.png", (200, 30, 30)), _png(folder / "ref_b.png", (30, 30, 200))]
    lines = []
    for i in range(n_images):
        image = _png(folder / f"gen{i}.png", (20 * i + 40, 90, 150))
        lines += [json.dumps({"refs": refs, "image": image, "method": method})] * lines_per_image
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_output_folder_is_checked_before_any_work(tmp_path):
    manifest = make_set(tmp_path)
    (tmp_path / "taken").write_text("a file where the output folder should be")
    analyzer = CountingAnalyzer()
    with pytest.raises(OutputError, match="is a file"):
        evaluate_manifest(manifest, tmp_path / "taken", analyzer, progress=False)
    assert analyzer.calls == 0
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(OutputError, match="Cannot write into the output folder"):
            evaluate_manifest(manifest, tmp_path / "ro" / "out", analyzer, progress=False)
        assert analyzer.calls == 0


def test_every_unreadable_generated_image_is_reported_up_front_with_its_lines(tmp_path, data_dir):
    manifest = make_set(tmp_path, n_images=4)
    data = (data_dir / "obama.jpg").read_bytes()
    (tmp_path / "gen1.png").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (tmp_path / "gen3.png").write_text("not a picture")
    analyzer = CountingAnalyzer()
    with pytest.raises(ManifestError) as err:
        evaluate_manifest(manifest, tmp_path / "out", analyzer, progress=False)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "line 2:" in msg and "truncated" in msg and "line 4:" in msg
    assert "line 1:" not in msg and "line 3:" not in msg
    assert analyzer.calls == 2  # the references only: no generated image was analysed
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_rows_are_appended_and_ctrl_c_keeps_them_then_the_rerun_resumes(tmp_path):
    manifest = make_set(tmp_path, n_images=5)
    out = tmp_path / "out"
    # calls: 2 references, then generated images; Ctrl-C while analysing the 3rd one
    with pytest.raises(KeyboardInterrupt):
        evaluate_manifest(manifest, out, CountingAnalyzer(interrupt_at=5), progress=False)
    assert [r["line"] for r in rows(out)] == [1, 2]
    assert not (out / "summary.md").exists()
    again = CountingAnalyzer()
    summary = evaluate_manifest(manifest, out, again, progress=False)
    assert again.calls == 2 + 3  # the references and the 3 images not done
    assert [r["line"] for r in rows(out)] == [1, 2, 3, 4, 5] and summary["group"]["m"]["static"]["n"] == 5
    # a third run has nothing left to compute and gives the same table
    third = CountingAnalyzer()
    assert evaluate_manifest(manifest, out, third, progress=False) == summary and third.calls == 0


def test_a_row_cut_short_by_a_kill_and_a_changed_image_are_redone(tmp_path):
    manifest = make_set(tmp_path, n_images=3)
    out = tmp_path / "out"
    evaluate_manifest(manifest, out, CountingAnalyzer(), progress=False)
    kept = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(kept[:2]) + "\n" + kept[2][:40])  # killed mid-write
    _png(tmp_path / "gen0.png", (1, 2, 3))  # regenerated since
    os.utime(tmp_path / "gen0.png", ns=(1, 1))
    again = CountingAnalyzer()
    evaluate_manifest(manifest, out, again, progress=False)
    assert again.calls == 2 + 2  # references + lines 1 (changed) and 3 (cut short)
    got = rows(out)
    assert [r["line"] for r in got] == [1, 2, 3] and all(r["image_sig"] for r in got)


def test_results_of_another_manifest_are_not_replaced_without_overwrite(tmp_path):
    manifest = make_set(tmp_path, n_images=2)
    out = tmp_path / "out"
    evaluate_manifest(manifest, out, CountingAnalyzer(), progress=False)
    before = (out / "results.jsonl").read_text()
    other = tmp_path / "other.jsonl"
    other.write_text(manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(OutputError, match="different manifest_sha256.*--overwrite"):
        evaluate_manifest(other, out, CountingAnalyzer(), progress=False)
    assert (out / "results.jsonl").read_text() == before
    (out / "evaluate_run.json").unlink()  # results of an unknown run (e.g. an older IdGlow)
    with pytest.raises(OutputError, match="unknown run"):
        evaluate_manifest(other, out, CountingAnalyzer(), progress=False)
    evaluate_manifest(other, out, CountingAnalyzer(), progress=False, overwrite=True)
    assert [r["line"] for r in rows(out)] == [1]


def test_each_distinct_image_is_analysed_once_however_many_lines_name_it(tmp_path):
    manifest = make_set(tmp_path, n_images=2, lines_per_image=6)
    analyzer = CountingAnalyzer()
    summary = evaluate_manifest(manifest, tmp_path / "out", analyzer, progress=False)
    assert analyzer.calls == 2 + 2 and summary["group"]["m"]["static"]["n"] == 12
    got = rows(tmp_path / "out")
    assert [r["line"] for r in got] == list(range(1, 13))
    assert got[0]["similarity"] == got[5]["similarity"] and got[6]["similarity"] == got[11]["similarity"]


def test_worker_processes_give_the_same_rows(tmp_path):
    manifest = make_set(tmp_path, n_images=4)
    evaluate_manifest(manifest, tmp_path / "one", OneFaceAnalyzer(), progress=False)
    evaluate_manifest(manifest, tmp_path / "two", OneFaceAnalyzer(), progress=False, workers=2)
    assert rows(tmp_path / "one") == rows(tmp_path / "two")


def test_method_names_cannot_break_the_table():
    base = {"task": "group", "prompt_mode": "static", "facesim_strict": 0.5, "facesim_matched": 0.5,
            "count_ok": True}
    md = format_tables(summarise([{**base, "method": "ours | v2\nlong"}, {**base, "method": "plain"}]))
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, separator, two rows
    assert table[2].startswith(r"| ours \| v2 long | 0.50 |")
    assert len({line.count("|") - line.count(r"\|") for line in table}) == 1  # same column count everywhere


def test_manifest_messages_name_the_real_cause(tmp_path):
    _png(tmp_path / "a.png", (1, 1, 1))
    (tmp_path / "shots").mkdir()
    lines = [json.dumps({"refs": "a.png", "image": "a.png"}).encode(),
             json.dumps({"refs": ["a.png"], "image": "shots"}).encode(),
             '{"refs": ["a.png"], "image": "a.png", "prompt": "caf\u00e9"}'.encode("latin-1")]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path / "m.jsonl")
    msg = str(err.value)
    assert """line 1: 'refs' must be a list of file paths, got one string; write ["a.png"]""" in msg
    assert "line 2: '" in msg and "shots' is a folder, not a file" in msg and "not found" not in msg
    assert "line 3: not UTF-8 text" in msg
    with pytest.raises(ManifestError, match="is a folder, not a file"):
        read_manifest(tmp_path / "shots")


def test_evaluate_command_refuses_cuda_workers_and_an_unwritable_out(tmp_path, capsys):
    manifest = make_set(tmp_path)
    assert cli_main(["evaluate", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--workers", "2",
                     "--provider", "cuda"]) == 2
    assert "--workers applies to CPU" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli_main(["evaluate", "--manifest", str(manifest), "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_evaluate_command_refuses_another_manifest_before_loading_models(tmp_path, capsys, monkeypatch):
    manifest = make_set(tmp_path, n_images=2)
    out = tmp_path / "out"
    evaluate_manifest(manifest, out, CountingAnalyzer(), progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(manifest.read_text().splitlines()[0] + "\n")

    def no_models(args):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("idglow_core.cli.evaluate.analyzer_from_args", no_models)
    assert cli_main(["evaluate", "--manifest", str(other), "--out", str(out)]) == 2
    assert "different manifest_sha256" in capsys.readouterr().err


def test_workers_need_a_picklable_analyzer_and_a_positive_count():
    from idglow_core.errors import InputError
    from idglow_core.faces.batch import FileAnalyzer

    local = CountingAnalyzer()
    local.hook = lambda: None  # a lambda cannot be sent to another process
    with pytest.raises(InputError, match="cannot be sent to worker processes"):
        FileAnalyzer(local, workers=2)
    with pytest.raises(InputError, match="workers must be a whole number >= 1"):
        FileAnalyzer(OneFaceAnalyzer(), workers=0)
