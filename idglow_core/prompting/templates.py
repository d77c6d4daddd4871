"""Static prompt templates for the two tasks of the paper (the "static prompts" of Tables 1-2).

Qwen-Image-Edit-Plus refers to its input images as "Picture 1", "Picture 2", ... in the order they are
given; the templates name each subject by that number and by position, left to right.
"""
from __future__ import annotations

from ..errors import InputError

TASKS = ("group", "age")

_POSITIONS = {1: ["in the centre"], 2: ["on the left", "on the right"],
              3: ["on the left", "in the middle", "on the right"],
              4: ["on the far left", "second from the left", "second from the right", "on the far right"]}


def subject_positions(k: int) -> list[str]:
    """Position words for k subjects, left to right ('on the left', 'in the middle', ...)."""
    if k in _POSITIONS:
        return _POSITIONS[k]
    return [f"at position {i + 1} from the left" for i in range(k)]


def static_prompt(task: str, k: int) -> str:
    """The static template for ``task`` ('group' = Task 1, direct group fusion; 'age' = Task 2,
    age-transformed group) with ``k`` reference subjects (k >= 1)."""
    if task not in TASKS:
        raise InputError(f"Unknown task '{task}'. Use one of {', '.join(TASKS)} "
                         f"('group' = direct group fusion, 'age' = the same people as children).")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"The number of subjects must be a positive integer, got {k!r}. "
                         f"Pass the number of reference portraits.")
    subjects = "; ".join(f"the person from Picture {i + 1} stands {pos}" for i, pos in enumerate(subject_positions(k)))
    if task == "group":
        return (f"A natural, photorealistic group photo of {k} {'person' if k == 1 else 'people'} together in one "
                f"coherent scene: {subjects}. Keep each person's face, hairstyle and skin tone identical to their "
                f"picture. Consistent lighting and colour on every face, relaxed natural poses, sharp focus.")
    return (f"A natural, photorealistic group photo of the same {k} {'person' if k == 1 else 'people'} as young "
            f"children, about six years old: {subjects}. Give every child child-like proportions (a larger head "
            f"relative to the body, rounder cheeks, a smaller nose and chin, smooth skin) while keeping the eye "
            f"shape, nose contour and other distinctive facial features of the person in their picture. "
            f"Consistent lighting, sharp focus.")
