"""Build the shipped example set for ``python -m idglow_core evaluate`` (the Quick start's main job).

Group "generations" are composites of the public-domain test photos pasted side by side, so the right answer
is known: ``expected_assignment`` gives, for each reference, the index (left to right) of its face, -1 when it
is absent, or null where two faces of the same person make either answer right (impostor rows).
Three "methods" stand for three kinds of output:

- ``composite (right people)``: every reference appears, in a different order from the references;
- ``composite (one missing)``: one reference has no face in the image;
- ``composite (impostor)``: one reference is replaced by a different person.

Run from the repository root: ``python demo/build_example_set.py`` (deterministic; the output is committed).
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data"
OUT = ROOT / "demo" / "group_set"
H = 400


def photo(name: str, flip: bool = False) -> Image.Image:
    img = Image.open(PHOTOS / f"{name}.jpg").convert("RGB")
    img = img.resize((round(img.width * H / img.height), H), Image.LANCZOS)
    return ImageOps.mirror(img) if flip else img


def blank(width: int = 180) -> Image.Image:
    return Image.new("RGB", (width, H), (200, 200, 205))


def composite(parts: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (sum(p.width for p in parts) + 10 * (len(parts) - 1), H), (235, 235, 235))
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width + 10
    return canvas


# (method, prompt_mode, refs, parts, expected_assignment)
REFS2 = ["obama", "biden"]
REFS3 = ["obama", "biden", "astronaut"]
SAMPLES = [
    ("composite (right people)", "static", REFS2, [("biden", True), ("obama2", False)], [1, 0]),
    ("composite (right people)", "static", REFS3, [("astronaut", True), ("obama3", False), ("biden", True)], [1, 2, 0]),
    ("composite (right people)", "dynamic", REFS2, [("obama3", False), ("biden", True)], [0, 1]),
    ("composite (right people)", "dynamic", REFS3, [("biden", True), ("astronaut", True), ("obama2", False)], [2, 0, 1]),
    ("composite (one missing)", "static", REFS2, [("obama2", False), None], [0, -1]),
    ("composite (one missing)", "static", REFS3, [("biden", True), None, ("obama3", False)], [1, 0, -1]),
    ("composite (one missing)", "dynamic", REFS2, [None, ("biden", True)], [-1, 0]),
    ("composite (one missing)", "dynamic", REFS3, [("astronaut", True), ("obama2", False)], [1, -1, 0]),
    ("composite (impostor)", "static", REFS2, [("astronaut", True), ("obama3", False)], [1, 0]),
    ("composite (impostor)", "static", REFS3, [("biden", True), ("obama2", False), ("obama3", False)], [None, 0, None]),
    ("composite (impostor)", "dynamic", REFS2, [("obama2", False), ("astronaut", True)], [0, 1]),
    ("composite (impostor)", "dynamic", REFS3, [("obama3", False), ("obama2", False), ("biden", True)], [None, 2, None]),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (method, mode, refs, parts, expected) in enumerate(SAMPLES):
        img = composite([photo(*p) if p else blank() for p in parts])
        name = f"sample_{i:02d}.jpg"
        img.save(OUT / name, quality=88)
        lines.append({"refs": [f"../../tests/data/{r}.jpg" for r in refs], "image": name,
                      "prompt": f"group photo of {len(refs)} people", "task": "group", "prompt_mode": mode,
                      "method": method, "expected_assignment": expected})
    with open(OUT / "manifest.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in lines)
    print(f"wrote {len(lines)} samples to {OUT}")


if __name__ == "__main__":
    main()
