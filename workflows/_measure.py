"""Lays the shared workflows out at the sizes the real ComfyUI frontend gives their nodes, and makes their pictures.

Starts ComfyUI (``COMFYUI_DIR``, 127.0.0.1, its own base directory) and the real frontend in headless Chromium,
drops each workflow on the canvas with the test portraits loaded, records every node's size into
``workflows/_layout/node_sizes.json`` (the layout in ``_build.py`` never goes below it), rebuilds the workflows and NODES.md,
checks that no two nodes overlap, runs the scoring workflow, and writes

- ``workflows/<name>.jpg``: the template thumbnails the frontend's template browser asks for;
- ``docs/workflows/<name>.png``: screenshots for the README.

    COMFYUI_DIR=/path/to/ComfyUI python workflows/_measure.py

Needs Debian's ``chromium`` and ``pip install playwright`` (no browser download).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import browser  # noqa: E402
import comfy_server  # noqa: E402

DOCS = REPO / "docs" / "workflows"
THUMB_WIDTH = 640
THUMB_CROP = (60, 110, 1900, 1060)  # left, top, right, bottom of a 1920x1080 screenshot: the canvas under the menus


def _builder():
    import importlib.util
    spec = importlib.util.spec_from_file_location("idglow_workflow_build", HERE / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_inputs(server: comfy_server.ComfyServer) -> None:
    """The portraits the workflows name (Obama, Biden) and a 'generated' image holding both, side by side."""
    data = REPO / "tests" / "data"
    server.upload_image(data / "obama.jpg", "person1.png")
    server.upload_image(data / "biden.jpg", "person2.png")
    left, right = Image.open(data / "biden.jpg").convert("RGB"), Image.open(data / "obama2.jpg").convert("RGB")
    h = min(left.height, right.height)
    left, right = (im.resize((round(im.width * h / im.height), h)) for im in (left, right))
    both = Image.new("RGB", (left.width + right.width, h))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    with tempfile.TemporaryDirectory() as tmp:
        both.save(Path(tmp) / "generated.png")
        server.upload_image(Path(tmp) / "generated.png", "idglow_task1_00001_.png")


def write_all(build, info: dict) -> list[Path]:
    paths = []
    for name, workflow in build.build_all(info).items():
        path = HERE / name
        path.write_text(build.dumps(workflow), encoding="utf-8")
        paths.append(path)
    return paths


def measure(page, paths: list[Path], build) -> dict:
    """Drop each workflow; the largest size the frontend gave each node key, over all workflows."""
    sizes: dict = {}
    for path in paths:
        saved = {n["id"]: n for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
        geo = browser.drop_workflow(page, path)
        browser.close_dialogs(page)
        for node in geo["nodes"]:
            mine = saved[node["id"]]
            key = build.size_key(mine)
            # A width is recorded only where the frontend widened the node: a column's stretch is not a minimum.
            w = round(node["size"][0]) if node["size"][0] > mine["size"][0] + 0.5 else 0
            old = sizes.get(key, [0, 0])
            sizes[key] = [max(old[0], w), max(old[1], round(node["size"][1]))]
    return dict(sorted(sizes.items()))


def main() -> int:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("Set COMFYUI_DIR to a ComfyUI checkout (see NODES.md).", file=sys.stderr)
        return 2
    build = _builder()
    DOCS.mkdir(parents=True, exist_ok=True)
    with comfy_server.ComfyServer(Path(comfy_dir)) as server:
        stage_inputs(server)
        info = server.get("/object_info")
        with browser.editor(server.url, {"width": build.VIEW[0], "height": build.VIEW[1]}) as page:
            build.SIZES_FILE.unlink(missing_ok=True)  # from the size hints: widths stretched to a column stay free
            for _ in range(2):  # measure, rebuild at the measured sizes, measure again (a grown column moves nodes)
                paths = write_all(build, info)
                build.SIZES_FILE.write_text(json.dumps(measure(page, paths, build), indent=1) + "\n")
            paths = write_all(build, info)
            for path in paths:
                geo = browser.drop_workflow(page, path)
                browser.close_dialogs(page)  # the missing-models dialog of the generation workflows
                bad = browser.overlaps(geo)
                if bad:
                    print(f"{path.name}: overlapping nodes {bad}", file=sys.stderr)
                    return 1
                if path.name == build.SCORING:
                    browser.run_workflow(page, server)
                shot = DOCS / (path.stem + ".png")
                page.screenshot(path=str(shot))
                thumb = Image.open(shot).convert("RGB").crop(THUMB_CROP)  # the graph, without the editor's bars
                thumb = thumb.resize((THUMB_WIDTH, round(thumb.height * THUMB_WIDTH / thumb.width)), Image.LANCZOS)
                thumb.save(HERE / (path.stem + ".jpg"), quality=82)
                print(f"{path.name}: {len(geo['nodes'])} nodes, no overlaps; wrote {shot.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
