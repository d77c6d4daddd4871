"""The real ComfyUI frontend in headless Chromium (Debian's ``chromium`` driven by ``playwright`` from PyPI; no
browser download): open the editor of a :class:`comfy_server.ComfyServer`, drop a workflow file on the canvas as
a user does, read back what the frontend made of it (node geometry, groups, errors), run it, take screenshots.
"""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VIEWPORT = {"width": 1600, "height": 1000}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def editor(server_url: str, viewport: dict | None = None):
    """Yields a playwright page with the ComfyUI editor loaded (``window.app.graph`` ready), as a returning user
    (the first-visit template browser is marked as seen, so no modal covers the canvas)."""
    from playwright.sync_api import sync_playwright

    req = urllib.request.Request(server_url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.goto(server_url, wait_until="networkidle", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
            yield page
        finally:
            browser.close()


DROP_JS = """async ([name, text]) => {
  const canvas = document.querySelector('#graph-canvas') || document.querySelector('canvas');
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  for (const type of ['dragenter', 'dragover', 'drop']) {
    canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
  }
}"""

GEOMETRY_JS = """() => {
  const g = window.app.graph, LG = window.LiteGraph;
  return {
    title_height: LG.NODE_TITLE_HEIGHT,
    nodes: g._nodes.map(n => ({id: n.id, type: n.type, title: n.title, mode: n.mode,
                               pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
                               has_errors: !!n.has_errors})),
    groups: (g._groups || g.groups || []).map(gr => ({title: gr.title, bounding: Array.from(gr._bounding || gr.bounding)})),
    ds: {scale: window.app.canvas.ds.scale, offset: Array.from(window.app.canvas.ds.offset)},
    canvas: (() => { const r = window.app.canvas.canvas.getBoundingClientRect();
                     return [r.left, r.top, r.width, r.height]; })(),
  };
}"""


def drop_workflow(page, path: Path) -> dict:
    """Drop a workflow file on the canvas (as a user dragging it from the desktop); returns the geometry."""
    before = page.evaluate("() => window.app.graph._nodes.length")
    page.evaluate(DROP_JS, [Path(path).name, Path(path).read_text(encoding="utf-8")])
    page.wait_for_function(f"() => window.app.graph._nodes.length !== {before} || "
                           f"window.app.graph._nodes.length > 0", timeout=60_000)
    page.wait_for_timeout(1500)  # the frontend sizes nodes (and loads image previews) after configure
    return geometry(page)


def geometry(page) -> dict:
    return page.evaluate(GEOMETRY_JS)


def node_rect(node: dict, title_height: float) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` in graph units, title bar included (``pos`` is the body's top-left)."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - title_height, x + w, y + h


def overlaps(geo: dict, gap: float = 0.0) -> list[tuple[str, str]]:
    """Pairs of nodes whose rectangles (grown by ``gap`` / 2 each side) intersect."""
    th = geo["title_height"]
    rects = [(f"{n['id']} {n['title']}", node_rect(n, th)) for n in geo["nodes"]]
    bad = []
    for i, (a, ra) in enumerate(rects):
        for b, rb in rects[i + 1:]:
            if ra[0] < rb[2] + gap and rb[0] < ra[2] + gap and ra[1] < rb[3] + gap and rb[1] < ra[3] + gap:
                bad.append((a, b))
    return bad


def run_workflow(page, server, timeout: float = 300.0) -> dict:
    """Click the editor's Run button and wait until the server's history has the finished prompt; returns its
    history entry (``status``, ``outputs``). The frontend then has a moment to draw the outputs."""
    before = set(server.get("/history"))
    page.locator('button[aria-label="Run"]').first.click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") or
                v.get("status", {}).get("status_str") == "error"]
        if done:
            page.wait_for_timeout(1500)
            return done[0]
        time.sleep(0.5)
    raise TimeoutError(f"the workflow did not finish within {timeout:.0f} s")


def dialogs(page) -> list[str]:
    """Texts of the open modal dialogs (missing nodes or models, errors)."""
    return page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")


def close_dialogs(page) -> None:
    """Close open dialogs as a user would (Escape), e.g. the missing-models dialog after reading it."""
    for _ in range(3):
        if not dialogs(page):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(400)


def to_screen(geo: dict, x: float, y: float) -> tuple[float, float]:
    """Graph coordinates -> page pixels under the current view (``ds``)."""
    s, (ox, oy) = geo["ds"]["scale"], geo["ds"]["offset"]
    return geo["canvas"][0] + (x + ox) * s, geo["canvas"][1] + (y + oy) * s


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)
