"""Reading images and converting between the layouts the library uses.

Conventions: a "numpy image" is ``[H, W, 3]`` uint8 RGB; a "tensor image" is ``[B, 3, H, W]`` float in
[0, 1] (torch); ComfyUI's IMAGE is ``[B, H, W, 3]`` float in [0, 1] and is converted in ``nodes/``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, InputError

__all__ = ["load_image", "to_rgb_uint8", "save_image_atomic"]


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white, so transparent pixels do not turn black."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB.

    EXIF orientation is applied; grayscale, palette, 16-bit and RGBA/LA images are converted (alpha is
    composited onto white). Raises :class:`ImageReadError` for a missing or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image file not found: '{path}'. Check the path (relative paths are resolved "
                             f"from the current directory or from the manifest's folder).")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = _flatten_alpha(img)
            elif img.mode == "I;16" or img.mode == "I":
                arr = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
            else:
                img = img.convert("RGB")
            return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"Cannot read '{path}' as an image ({type(exc).__name__}: {exc}). "
                             f"Use a JPEG, PNG or WebP file.") from exc


def to_rgb_uint8(image) -> np.ndarray:
    """Accept a numpy array (HxW, HxWx1, HxWx3, HxWx4; uint8 or float in [0, 1]) or a PIL image and
    return ``[H, W, 3]`` uint8 RGB."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA"):
            return np.asarray(_flatten_alpha(image), dtype=np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"Expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got "
                         f"{tuple(arr.shape)}. Pass one image at a time in HWC layout.")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = np.asarray(_flatten_alpha(Image.fromarray(arr, "RGBA")), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def save_image_atomic(image: np.ndarray, path: str | os.PathLike, **save_kwargs) -> Path:
    """Write ``[H, W, 3]`` uint8 RGB to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    Image.fromarray(to_rgb_uint8(image)).save(tmp, format=fmt, **save_kwargs)
    os.replace(tmp, path)
    return path
