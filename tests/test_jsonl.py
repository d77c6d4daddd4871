"""The shared JSONL reading: every problem with its line number, paths resolved from the manifest's folder."""
from pathlib import Path

import pytest

from idglow_core.errors import ManifestError
from idglow_core.jsonl import MAX_LISTED, raise_problems, read_jsonl, resolve_path, write_jsonl_atomic


def test_read_jsonl_skips_blank_and_bad_lines(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n\n[1, 2]\n{"b": \n  \n{"c": 3}\n')
    problems = []
    assert read_jsonl(tmp_path / "m.jsonl", problems) == [(1, {"a": 1}), (6, {"c": 3})]
    assert problems[0] == "line 3: expected a JSON object, got list"
    assert problems[1].startswith("line 4: not valid JSON")


def test_resolve_path(tmp_path):
    assert resolve_path(tmp_path, "x/y.png") == tmp_path / "x" / "y.png"
    assert resolve_path(tmp_path, "/abs/y.png") == Path("/abs/y.png")
    assert resolve_path(tmp_path, "~/y.png") == Path.home() / "y.png"


def test_raise_problems_lists_at_most_the_limit():
    raise_problems([], "Nothing")  # no problem, no error
    problems = [f"line {i}: bad" for i in range(1, MAX_LISTED + 6)]
    with pytest.raises(ManifestError) as err:
        raise_problems(problems, "Manifest 'm.jsonl'")
    msg = str(err.value)
    assert msg.startswith(f"Manifest 'm.jsonl' has {MAX_LISTED + 5} problem(s)")
    assert f"line {MAX_LISTED}: bad" in msg and f"line {MAX_LISTED + 1}: bad" not in msg and "and 5 more" in msg


def test_write_jsonl_atomic_round_trips(tmp_path):
    write_jsonl_atomic([{"a": 1}, {"b": [2]}], tmp_path / "sub" / "o.jsonl")
    problems = []
    assert read_jsonl(tmp_path / "sub" / "o.jsonl", problems) == [(1, {"a": 1}), (2, {"b": [2]})]
    assert not problems and [p.name for p in (tmp_path / "sub").iterdir()] == ["o.jsonl"]


def test_non_utf8_lines_are_problems_with_line_numbers_and_a_bom_is_fine(tmp_path):
    (tmp_path / "m.jsonl").write_bytes('\ufeff{"a": 1}\n'.encode() + '{"b": "caf\u00e9"}\n'.encode("latin-1") +
                                       b'{"c": 3}\n')
    problems = []
    assert read_jsonl(tmp_path / "m.jsonl", problems) == [(1, {"a": 1}), (3, {"c": 3})]
    assert problems == ["line 2: not UTF-8 text (byte 0xe9 at column 11); save the file as UTF-8"]


def test_file_problem_tells_a_folder_from_a_missing_file(tmp_path):
    from idglow_core.jsonl import file_problem

    (tmp_path / "f.png").write_bytes(b"x")
    (tmp_path / "d.png").mkdir()
    assert file_problem(tmp_path / "f.png") is None
    assert file_problem(tmp_path / "d.png") == f"'{tmp_path / 'd.png'}' is a folder, not a file"
    assert file_problem(tmp_path / "n.png") == f"file not found: {tmp_path / 'n.png'}"
