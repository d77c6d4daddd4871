"""Pieces of the static review pages (preference pairs, SFT data): self-contained HTML, no external JS/CSS,
images linked by paths relative to the page, and a button that downloads the reviewer's decisions as JSON."""
from __future__ import annotations

import html
import logging
import os
from pathlib import Path

__all__ = ["STYLE", "thumb", "download_script", "write_page"]

log = logging.getLogger("idglow")

STYLE = ("body{font-family:sans-serif;margin:1em}#bar{position:sticky;top:0;background:#fff;padding:.5em 0;"
         "z-index:1}figure{margin:0}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;"
         "text-align:right}.prompt{font-style:italic}")


def thumb(path: str | os.PathLike, folder: Path, cls: str) -> str:
    """An ``<img>`` of ``path`` inside a link to the full image, both relative to the page's ``folder``."""
    src = html.escape(Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix(), quote=True)
    return f'<a href="{src}"><img class="{cls}" src="{src}" alt=""></a>'


def download_script(collect: str, filename: str = "decisions.json") -> str:
    """JS defining ``download()``: saves ``JSON.stringify(<collect>())`` as ``filename``. ``collect`` names a JS
    function (defined by the caller) that returns the decisions object."""
    return ("function download(){const b=new Blob([JSON.stringify(%s(),null,1)],{type:'application/json'});"
            "const a=document.createElement('a');a.href=URL.createObjectURL(b);a.download='%s';a.click();}"
            % (collect, filename))


def write_page(html_path: str | os.PathLike, title: str, bar: str, body: str, style: str = "",
               script: str = "") -> Path:
    """Write one self-contained page atomically: a sticky bar (``bar`` HTML, then a "Download decisions"
    button), ``body``, and the inline ``script``. Returns the path."""
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}{style}</style></head><body><div id=\"bar\">{bar} "
            f'<button onclick="download()">Download decisions</button></div>'
            f"{body}<script>{script}</script></body></html>\n")
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    return html_path
