"""Badcase mining for the prompt enricher: ranking, categories, markdown/JSON output, CLI."""
from __future__ import annotations

import json

import pytest

from idglow_core.errors import ManifestError
from idglow_core.prompting.badcases import main, mine_badcases, percentile_ranks, read_scores, suggest_category

PRECISE = ("The person from Picture 1 on the left wearing a red coat; the person from Picture 2 on the right with "
           "long hair; soft window light on both faces.")


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_percentile_ranks_by_hand():
    # sorted: 0.1, 0.1 (tied at ranks 0 and 1 -> 0.5), 0.3 (rank 2), 0.5 (rank 3); divided by n - 1 = 3
    assert percentile_ranks([0.3, 0.1, 0.5, 0.1]) == pytest.approx([2 / 3, 0.5 / 3, 1.0, 0.5 / 3])
    assert percentile_ranks([7.0]) == [0.5]


def test_suggested_categories_follow_the_taxonomy():
    assert suggest_category("A group photo of two people in warm light.", "group", 2) == "detail_omission"
    assert suggest_category("Picture 1 wearing red, Picture 2 with a hat, at a party.", "group", 2) \
        == "lighting_inconsistency"
    assert suggest_category("Picture 1 and Picture 2 smile, lit by the sun.", "group", 2) == "attribute_leakage"
    assert suggest_category(PRECISE, "group", 2) == "prompt_ok"


def test_worst_cases_per_category_by_hand(tmp_path):
    rows = [{"id": "a", "prompt": PRECISE, "facesim": 0.60, "aesthetic": 6.0, "category": "attribute_leakage"},
            {"id": "b", "prompt": PRECISE, "facesim": 0.20, "aesthetic": 5.0, "category": "attribute_leakage"},
            {"id": "c", "prompt": PRECISE, "face_sim": 0.40, "aes": 4.0, "category": "attribute_leakage"},
            {"id": "d", "prompt": "Two people.", "facesim": 0.50, "aesthetic": 7.0, "k": 2}]
    cases = read_scores(_write(tmp_path / "scores.jsonl", rows))
    groups = mine_badcases(cases, top=2)
    # FaceSim ranks a..d: 3/3, 0, 1/3, 2/3; aesthetic ranks: 2/3, 1/3, 0, 3/3 -> scores 5/6, 1/6, 1/6, 5/6
    assert [c.id for c in groups["attribute_leakage"]] == ["b", "c"]  # tie on score, lower FaceSim first
    assert [c.score for c in groups["attribute_leakage"]] == pytest.approx([1 / 6, 1 / 6])
    assert [(c.id, c.suggested) for c in groups["detail_omission"]] == [("d", True)]
    assert groups["detail_omission"][0].score == pytest.approx(5 / 6)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    scores = _write(tmp_path / "s.jsonl", [
        {"id": i, "prompt": PRECISE, "facesim": f, "aesthetic": 5.0, "generation": f"out/{i}.png"}
        for i, f in enumerate([0.5, 0.1, 0.3])])
    assert main([str(scores), "--format", "json", "--top", "2", "--out", str(tmp_path / "bad.json")]) == 0
    report = json.loads((tmp_path / "bad.json").read_text())
    assert [c["id"] for c in report["prompt_ok"]] == ["1", "2"]
    assert report["prompt_ok"][0]["generation"] == "out/1.png"
    assert main([str(scores)]) == 0
    out = capsys.readouterr().out
    assert "## prompt_ok (3)" in out and "| 1* | 0.250 | 0.100 | 5.00 |" in out


def test_bad_scores_files_name_the_problem(tmp_path, capsys):
    with pytest.raises(ManifestError, match="line 2: no 'aesthetic' score"):
        read_scores(_write(tmp_path / "a.jsonl", [{"prompt": "p", "facesim": 1, "aesthetic": 2},
                                                  {"prompt": "p", "facesim": 1}]))
    with pytest.raises(ManifestError, match="line 1: 'facesim' is 'high', not a number"):
        read_scores(_write(tmp_path / "b.jsonl", [{"prompt": "p", "facesim": "high", "aesthetic": 2}]))
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "Scores file not found" in capsys.readouterr().err
