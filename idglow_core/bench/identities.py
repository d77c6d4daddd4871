"""Reading a folder of identity portraits (CelebA-HQ style): one sub-folder per identity holding its
portraits, or one image file per identity."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["Identity", "IMAGE_SUFFIXES", "list_images", "read_identities"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Identity:
    """One person: ``name`` (the sub-folder or file stem) and their portraits (sorted)."""

    name: str
    portraits: tuple[Path, ...]


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (hidden files skipped), sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_identities(folder: str | os.PathLike) -> list[Identity]:
    """Identities in ``folder``: each sub-folder with images is one identity, each loose image file another."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Identity folder '{folder}' does not exist. Pass a folder with one sub-folder (or one "
                         f"image file) per person.")
    out = [Identity(p.stem, (p,)) for p in list_images(folder)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub)
        if images:
            out.append(Identity(sub.name, tuple(images)))
    names = [i.name for i in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"Identity names {dupes} appear both as a file and as a folder in '{folder}'. Rename one.")
    return sorted(out, key=lambda i: i.name)
