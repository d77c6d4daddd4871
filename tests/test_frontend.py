"""The shared workflows in the real ComfyUI frontend, as a user meets them: a ComfyUI server (``COMFYUI_DIR``, on
127.0.0.1) and its editor in headless Chromium (Debian's ``chromium``, ``playwright`` from PyPI). Each workflow file
is dropped on the canvas; no node may be missing, overlap another or be hidden by the saved view; the scoring
workflow is run on real photos with the offline dlib backend and its FaceSim numbers must show in the page.
Skipped, with the reason printed, where ComfyUI, chromium or playwright is missing.
"""
from __future__ import annotations

import importlib.util
import json
import urllib.parse

import pytest

import browser
import comfy_helpers as ch
import comfy_server

WORKFLOWS = sorted(p.name for p in (ch.REPO / "workflows").glob("*.json"))
MENU_BOTTOM, SIDEBAR_RIGHT = 90, 60   # page pixels taken by the frontend's menu bar / tabs and its side bar


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("idglow_workflow_measure", ch.REPO / "workflows" / "_measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(measure):
    comfy_dir = ch.comfy_dir_or_skip()
    if browser.chromium_path() is None:
        _skip("no chromium on PATH: apt-get install chromium (the browser tests drive Debian's build)")
    if importlib.util.find_spec("playwright") is None:
        _skip("playwright is not installed: pip install playwright (no browser download is needed)")
    with comfy_server.ComfyServer(comfy_dir) as srv:
        measure.stage_inputs(srv)
        yield srv


@pytest.fixture(scope="module")
def page(server, measure):
    view = measure._builder().VIEW
    with browser.editor(server.url, {"width": view[0], "height": view[1]}) as pg:
        yield pg


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_with_every_node_known_apart_and_in_view(page, measure, name):
    build = measure._builder()
    path = ch.REPO / "workflows" / name
    saved = {n["id"]: n for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
    geo = browser.drop_workflow(page, path)
    texts = browser.dialogs(page)
    browser.close_dialogs(page)
    assert not any("missing" in t.lower() and "node" in t.lower() for t in texts), texts
    if any(n["type"] == "UNETLoader" for n in saved.values()):   # the frontend offers the model files to download
        assert any("qwen_image_edit_2511_bf16.safetensors" in t for t in texts), texts
    assert len(geo["nodes"]) == len(saved)
    assert browser.overlaps(geo, gap=20) == [], "nodes closer than 20 px"
    for node in geo["nodes"]:                          # laid out at the frontend's own sizes: nothing had to grow
        want = saved[node["id"]]["size"]
        assert node["size"][0] <= want[0] + 1 and node["size"][1] <= want[1] + 1, (node, want)
    assert geo["ds"]["scale"] >= build.MIN_SCALE       # zoomed in enough that nodes are drawn with their text
    width, height = geo["canvas"][2], geo["canvas"][3]
    for node in geo["nodes"]:                          # the saved view shows the whole graph, clear of the menus
        x1, y1, x2, y2 = browser.node_rect(node, geo["title_height"])
        (sx1, sy1), (sx2, sy2) = browser.to_screen(geo, x1, y1), browser.to_screen(geo, x2, y2)
        assert sx1 >= SIDEBAR_RIGHT and sy1 >= MENU_BOTTOM and sx2 <= width and sy2 <= height, (node["title"], sx1,
                                                                                              sy1, sx2, sy2)
    for node in geo["nodes"]:                          # in a group, below its title (and any node badge)
        x1, y1, x2, y2 = browser.node_rect(node, geo["title_height"])
        inside = [g for g in geo["groups"] if g["bounding"][0] <= x1 and x2 <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] + build.GROUP_HEADER - geo["title_height"] <= y1
                  and y2 <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, (node["title"], inside)


def test_scoring_workflow_runs_on_real_photos_and_shows_facesim(page, server, measure):
    """Obama and Biden as references, a 'generated' image with Biden left and Obama right: with no extra model
    installed (dlib), the run succeeds and the FaceSim numbers are in the page."""
    build = measure._builder()
    browser.drop_workflow(page, ch.REPO / "workflows" / build.SCORING)
    browser.close_dialogs(page)
    entry = browser.run_workflow(page, server)
    assert entry["status"]["status_str"] == "success", entry["status"]
    texts = {o["text"][0] for o in entry["outputs"].values() if "text" in o}
    report = next(t for t in texts if t.startswith("image 1:"))
    assert "ref 1->face 2" in report and "ref 2->face 1" in report   # Hungarian: right person, right place
    strict = float(next(t for t in texts if t.replace(".", "", 1).isdigit() and t == t.strip()))
    assert strict > 0.92                                              # above dlib's same-person threshold
    shown = page.evaluate("() => Array.from(document.querySelectorAll('textarea'))"
                          ".filter(t => t.offsetParent !== null).map(t => t.value)")
    assert any(v.startswith(f"{strict}"[:6]) for v in shown), shown     # the number a user reads
    assert any("FaceSim over 1 image(s): strict" in v for v in shown), shown


def test_task_workflow_without_models_stops_with_what_to_do(page, server, measure):
    """A new user runs Task 1 on a fresh install: the run stops at validation with a dialog that names the missing
    model files and says that no adapter ships, how to train one and where it goes (not a silent partial run)."""
    before = set(server.get("/history"))
    browser.drop_workflow(page, ch.REPO / "workflows" / measure._builder().TASK1)
    browser.close_dialogs(page)
    page.locator('button[aria-label="Run"]').first.click()
    page.wait_for_function("() => document.querySelectorAll('.p-dialog').length > 0", timeout=60_000)
    text = "\n".join(browser.dialogs(page))
    browser.close_dialogs(page)
    assert "qwen_image_edit_2511_bf16.safetensors" in text and "IdGlow ships no trained adapter" in text, text
    assert "train/sft.py" in text and "models/idglow" in text, text
    assert set(server.get("/history")) == before          # nothing ran


def test_templates_are_listed_with_their_thumbnails(server):
    listing = server.get("/workflow_templates")[comfy_server.PACK_DIR_NAME]
    assert sorted(listing) == sorted(name[:-5] for name in WORKFLOWS)
    for name in listing:                               # the template browser asks for '<name>.jpg' beside each
        quoted = urllib.parse.quote(f"{name}.jpg")
        body = server.get(f"/api/workflow_templates/{comfy_server.PACK_DIR_NAME}/{quoted}")
        assert body[:3] == b"\xff\xd8\xff", name       # a JPEG
