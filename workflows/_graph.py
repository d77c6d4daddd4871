"""The UI-format (litegraph) workflow graph the shared workflows are built with, and its layout.

``widget_slots`` gives a node's ``widgets_values`` order from its schema, as the frontend saves it. ``Graph``
adds nodes and links, then lays them out in columns of titled groups at the sizes the real frontend gives each
node (``_layout/node_sizes.json``, measured by ``_measure.py``), with a saved view a user can read.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_slots(info: dict) -> list[tuple[str | None, list]]:
    """``[(input name, spec)]`` in ``widgets_values`` order; name None marks a UI-only extra value
    (``control_after_generate`` after seeds, the upload button value of LoadImage), as the frontend saves them."""
    slots = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            opts = _spec_options(spec)
            if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            slots.append((name, spec))
            control = opts.get("control_after_generate")
            if (spec[0] == "INT" and (control if control is not None else name in ("seed", "noise_seed"))) or \
                    (spec[0] != "INT" and control):
                slots.append((None, "control_after_generate"))
            if any(k.endswith("_upload") and v for k, v in opts.items()):
                slots.append((None, "upload"))
    return slots


def default_value(spec):
    opts = _spec_options(spec)
    if "default" in opts:
        return opts["default"]
    choices = spec[0] if isinstance(spec[0], list) else opts.get("options")
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0], "")


# ------------------------------------------------------------------------------------------------- layout
# Sizes the real frontend gives each node (measured by workflows/_measure.py in headless Chromium): a saved size
# smaller than the frontend's makes it grow the node over its neighbours, so every node is laid out at
# max(its size hint, the measured size).
SIZES_FILE = HERE / "_layout" / "node_sizes.json"  # not in workflows/ itself: ComfyUI lists every *.json there
TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
GAP = 40              # between two nodes of a column
COLUMN_GAP = 70       # between two columns (room for the links' bends)
GROUP_PAD = 20        # group border to nodes, left/right/bottom
GROUP_HEADER = 76     # group title (24 px font) + room for the node badges drawn above a node's title bar
GROUP_GAP = 50        # between two groups stacked in one column
VIEW = (1920, 1080)   # the screen the saved view is made for
VIEW_MARGIN = (90, 120, 40, 40)   # left (sidebar), top (menu + tabs), right, bottom, in pixels
# Below this zoom the frontend draws nodes as blank boxes (its min_font_size_for_lod 8 / NODE_TEXT_SIZE 14 at a
# device pixel ratio of 1): the saved view never zooms out further, and the layout is made to fit above it.
MIN_SCALE = 0.58
GROUP_COLOURS = {"models": "#3f789e", "identities": "#8a6d3b", "idglow": "#a1309b", "prompt": "#5a8a3b",
                 "sampling": "#3b5a8a", "output": "#444", "optional": "#555"}


def measured_sizes() -> dict[str, list[float]]:
    """``{"<type>|<title or ''>": [w, h]}`` from node_sizes.json (empty before the first measurement)."""
    return json.loads(SIZES_FILE.read_text(encoding="utf-8")) if SIZES_FILE.exists() else {}


def size_key(node: dict) -> str:
    """A saved node's key in node_sizes.json: its type, and its title where the workflow gives it one."""
    return f"{node['type']}|{node.get('title', '')}"


class Graph:
    """A UI-format workflow under construction: ``add`` nodes with widget values by name, ``link`` outputs to inputs,
    then ``to_json`` lays the nodes out in columns of titled groups (``layout``) from the measured sizes."""

    def __init__(self, object_info: dict, sizes: dict | None = None):
        self.info, self.nodes, self.links, self.groups = object_info, [], [], []
        self.sizes = measured_sizes() if sizes is None else sizes
        self.columns: list[list[tuple[str, str, list[dict]]]] = []

    def add(self, node_type: str, widgets: dict | None = None, title: str | None = None,
            size: tuple[int, int] = (320, 100), mode: int = 0, models: list[dict] | None = None) -> dict:
        """mode: 0 = active, 2 = muted (kept in the file, not run), 4 = bypassed. size: the least size wanted.
        models: the files the node loads (name, url, directory), for the frontend's missing-model dialog."""
        info = self.info[node_type]
        widgets = dict(widgets or {})
        values, names = [], set()
        for name, spec in widget_slots(info):
            if name is None:
                values.append("fixed" if spec == "control_after_generate" else "image")
                continue
            names.add(name)
            values.append(widgets.pop(name) if name in widgets else default_value(spec))
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}; its widgets are {sorted(names)}")
        sockets = [{"name": n, "type": s[0] if isinstance(s[0], str) else "COMBO", "link": None}
                   for sec in ("required", "optional")
                   for n, s in ((n, info["input"].get(sec, {})[n]) for n in info.get("input_order", {}).get(sec, []))
                   if n not in names]
        out_names = info.get("output_name") or info["output"]
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": [0, 0], "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": mode, "inputs": sockets,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(out_names, info["output"]))],
                "properties": {"Node name for S&R": node_type, **({"models": models} if models else {})},
                "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str, size: tuple[int, int] = (420, 200)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": [0, 0], "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "title": title}
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else [o["name"] for o in src["outputs"]].index(output)
        kind = src["outputs"][slot]["type"]
        inputs = [i["name"] for i in dst["inputs"]]
        if input_name not in inputs:  # a widget turned into a socket, as the editor does when a link lands on it
            dst["inputs"].append({"name": input_name, "type": kind, "widget": {"name": input_name}, "link": None})
            inputs.append(input_name)
        link_id = len(self.links) + 1
        target = inputs.index(input_name)
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def column(self, *groups: tuple[str, str, list]) -> None:
        """One column of the layout, left to right: groups ``(title, colour key, items)`` stacked top to bottom;
        an item is a node, or a tuple of nodes placed side by side in one row."""
        self.columns.append(list(groups))

    def _measured(self, node: dict) -> dict:
        want = self.sizes.get(size_key(node))
        if want:
            node["size"] = [max(node["size"][0], want[0]), max(node["size"][1], want[1])]
        return node

    def layout(self) -> None:
        """Columns of groups, each node at max(size hint, measured size), lone nodes as wide as their column, with
        gaps; a row's nodes keep their widths."""
        x = 0.0
        for column in self.columns:
            rows = [item if isinstance(item, tuple) else (item,) for _, _, items in column for item in items]
            for row in rows:
                for node in row:
                    self._measured(node)
            width = max(sum(n["size"][0] for n in row) + GAP * (len(row) - 1) for row in rows)
            y = 0.0
            for title, colour, items in column:
                top, y = y, y + GROUP_HEADER
                for item in items:
                    row = item if isinstance(item, tuple) else (item,)
                    if len(row) == 1:
                        row[0]["size"][0] = width
                    left = x
                    for node in row:
                        node["pos"] = [left, y + TITLE_H]
                        left += node["size"][0] + GAP
                    y += TITLE_H + max(n["size"][1] for n in row) + GAP
                y += GROUP_PAD - GAP
                self.groups.append({"id": len(self.groups) + 1, "title": title,
                                    "bounding": [x - GROUP_PAD, top, width + 2 * GROUP_PAD, y - top],
                                    "color": GROUP_COLOURS[colour], "font_size": 24, "flags": {}})
                y += GROUP_GAP
            x += width + 2 * GROUP_PAD + COLUMN_GAP

    def view(self) -> dict:
        """The saved view (``extra.ds``): the whole graph on a VIEW-sized screen, clear of the sidebar and menus."""
        x1 = min(g["bounding"][0] for g in self.groups)
        y1 = min(g["bounding"][1] for g in self.groups)
        x2 = max(g["bounding"][0] + g["bounding"][2] for g in self.groups)
        y2 = max(g["bounding"][1] + g["bounding"][3] for g in self.groups)
        left, top, right, bottom = VIEW_MARGIN
        scale = min(1.0, (VIEW[0] - left - right) / (x2 - x1), (VIEW[1] - top - bottom) / (y2 - y1))
        scale = max(MIN_SCALE, round(scale, 3))
        return {"scale": scale, "offset": [round(left / scale - x1, 1), round(top / scale - y1, 1)]}

    def to_json(self, uid: str) -> dict:
        self.layout()
        return {"id": uid, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": self.view()}, "version": 0.4}


# Where the frontend's missing-model dialog offers the native Qwen-Image-Edit-2511 files (Comfy-Org's repacks, as
# in ComfyUI's own 2511 template).


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"
