"""Draws a UI-format workflow as a PNG (for the README), with PIL only: nodes, their sockets, links, groups.

    python workflows/_render.py workflows/idglow_task1_group_fusion.json docs/task1_graph.png
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TITLE_H, SLOT_H, MARGIN = 30, 20, 40
LINK_COLOURS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110), "IMAGE": (100, 200, 255),
                "CONDITIONING": (255, 170, 100), "LATENT": (255, 140, 200), "STRING": (140, 230, 140)}


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _bezier(p0, p3, steps: int = 24):
    dx = max(40.0, abs(p3[0] - p0[0]) * 0.5)
    p1, p2 = (p0[0] + dx, p0[1]), (p3[0] - dx, p3[1])
    pts = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        pts.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return pts


def _widget_lines(node: dict) -> list[str]:
    values = node.get("widgets_values") or []
    if node["type"] == "Note":
        width = max(20, int(node["size"][0] / 6.8))
        return [w for line in str(values[0] if values else "").splitlines() for w in textwrap.wrap(line, width) or [""]]
    shown = [v for v in values if not isinstance(v, (dict, list)) and v not in ("fixed", "image")]
    return [str(v)[:40] for v in shown[:6]]


def render(workflow: dict, out: str | os.PathLike, scale: float = 1.0) -> Path:
    """Write a PNG of ``workflow`` (litegraph JSON) to ``out``; returns the path."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes.values()] + [tuple(g["bounding"][:2]) + (g["bounding"][0] + g["bounding"][2],
                                                                      g["bounding"][1] + g["bounding"][3])
                                         for g in workflow.get("groups", [])]
    x0, y0 = min(b[0] for b in boxes) - MARGIN, min(b[1] for b in boxes) - MARGIN
    x1, y1 = max(b[2] for b in boxes) + MARGIN, max(b[3] for b in boxes) + MARGIN
    img = Image.new("RGB", (int(x1 - x0), int(y1 - y0)), (32, 32, 36))
    draw, font, small = ImageDraw.Draw(img), _font(15), _font(12)
    xy = (lambda x, y: (x - x0, y - y0))
    for g in workflow.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        draw.rectangle([xy(gx, gy), xy(gx + gw, gy + gh)], outline=(90, 130, 170), width=2)
        draw.text(xy(gx + 10, gy + 6), g["title"], fill=(150, 190, 230), font=font)
    for _, src, sslot, dst, dslot, kind in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = xy(a["pos"][0] + a["size"][0], a["pos"][1] + 12 + sslot * SLOT_H)
        p3 = xy(b["pos"][0], b["pos"][1] + 12 + dslot * SLOT_H)
        draw.line(_bezier(p0, p3), fill=LINK_COLOURS.get(kind, (200, 200, 200)), width=3)
    for n in nodes.values():
        x, y, w, h = n["pos"][0], n["pos"][1], n["size"][0], n["size"][1]
        muted = n.get("mode", 0) != 0
        body, head = ((50, 50, 56), (80, 80, 90)) if muted else ((58, 58, 64), (70, 50, 120) if n["type"].startswith(
            "IdGlow") else (60, 90, 60) if n["type"] == "Note" else (85, 85, 95))
        draw.rounded_rectangle([xy(x, y - TITLE_H), xy(x + w, y + h)], radius=8, fill=body, outline=(20, 20, 20))
        draw.rounded_rectangle([xy(x, y - TITLE_H), xy(x + w, y)], radius=8, fill=head)
        draw.text(xy(x + 10, y - TITLE_H + 7), n.get("title", n["type"]) + (" (muted)" if muted else ""),
                  fill=(235, 235, 235), font=font)
        for i, inp in enumerate(n.get("inputs", [])):
            cy = y + 12 + i * SLOT_H
            draw.ellipse([xy(x - 5, cy - 5), xy(x + 5, cy + 5)], fill=LINK_COLOURS.get(inp["type"], (170, 170, 170)))
            draw.text(xy(x + 10, cy - 8), inp["name"], fill=(200, 200, 200), font=small)
        for i, socket in enumerate(n.get("outputs", [])):
            cy = y + 12 + i * SLOT_H
            draw.ellipse([xy(x + w - 5, cy - 5), xy(x + w + 5, cy + 5)],
                         fill=LINK_COLOURS.get(socket["type"], (170, 170, 170)))
            label = socket["name"]
            draw.text(xy(x + w - 10 - draw.textlength(label, font=small), cy - 8), label, fill=(200, 200, 200),
                      font=small)
        first = y + 12 + max(len(n.get("inputs", [])), len(n.get("outputs", []))) * SLOT_H
        for i, line in enumerate(_widget_lines(n)):
            if first + i * 16 < y + h - 10:
                draw.text(xy(x + 10, first + i * 16), line, fill=(160, 200, 160), font=small)
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    img.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    print(render(json.loads(Path(src).read_text(encoding="utf-8")), dst, scale=float(sys.argv[3]) if len(sys.argv) > 3 else 0.75))
