"""The static prompt templates (the paper's "static prompts", Tables 1-2)."""
import pytest

from idglow_core.errors import InputError
from idglow_core.prompting import static_prompt
from idglow_core.prompting.templates import subject_positions


def test_every_subject_is_named_with_its_position():
    p = static_prompt("group", 3)
    for i, pos in enumerate(["on the left", "in the middle", "on the right"]):
        assert f"the person from Picture {i + 1} stands {pos}" in p
    assert "Picture 4" not in p and "3 people" in p


def test_age_template_asks_for_children_and_keeps_identity_cues():
    p = static_prompt("age", 2)
    assert "as young children" in p and "child-like proportions" in p and "eye shape" in p
    assert "Picture 1" in p and "Picture 2" in p


def test_positions_for_many_subjects():
    assert subject_positions(1) == ["in the centre"]
    assert subject_positions(6)[5] == "at position 6 from the left"
    assert "Picture 6" in static_prompt("group", 6)


@pytest.mark.parametrize("task,k", [("video", 2), ("group", 0), ("age", 2.5)])
def test_bad_arguments_raise(task, k):
    with pytest.raises(InputError):
        static_prompt(task, k)
