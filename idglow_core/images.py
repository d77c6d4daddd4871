"""Reading images and converting between the layouts the library uses.

Conventions: a "numpy image" is ``[H, W, 3]`` uint8 RGB; a "tensor image" is ``[B, 3, H, W]`` float in
[0, 1] (torch); ComfyUI's IMAGE is ``[B, H, W, 3]`` float in [0, 1] and is converted in ``nodes/``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, ImageTooLargeError, InputError

__all__ = ["load_image", "check_image", "as_image_list", "to_rgb_uint8", "save_image_atomic", "MAX_IMAGE_PIXELS"]

# Images above this many pixels are refused before they are decoded (a 24 MP photo is 24e6; an 80 MP RGB image
# already needs 240 MB decoded). It is below Pillow's own decompression-bomb warning (89.5 MP); Pillow's hard
# limit (179 MP) is turned into the same typed error.
MAX_IMAGE_PIXELS = 80_000_000


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white, so transparent pixels do not turn black."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _missing(path: Path) -> ImageReadError:
    if path.is_dir():
        return ImageReadError(f"'{path}' is a folder, not an image file. Name an image file inside it "
                              f"(a JPEG, PNG or WebP).")
    return ImageReadError(f"Image file not found: '{path}'. Check the path (relative paths are resolved "
                          f"from the current directory or from the manifest's folder).")


def _too_large(path: Path, pixels: int | None, limit: int) -> ImageTooLargeError:
    size = f"{pixels / 1e6:.1f} MP" if pixels else "more pixels than Pillow's safety limit"
    return ImageTooLargeError(f"'{path}' has {size}, above the limit of {limit / 1e6:.0f} MP "
                              f"(idglow_core.images.MAX_IMAGE_PIXELS; such files can be decompression bombs and a "
                              f"face detector gains nothing from them). Downscale it, e.g. to 4096 px on the long "
                              f"side.")


def _open_checked(path: Path, max_pixels: int):
    """Open ``path`` lazily (header only) after the folder/missing/size checks; the caller closes it."""
    if not path.is_file():
        raise _missing(path)
    try:
        with warnings.catch_warnings():  # our own limit below is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _too_large(path, None, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"'{path}' is not an image in a format Pillow knows ({exc}). Use a JPEG, PNG or "
                             f"WebP file.") from exc
    except OSError as exc:
        raise ImageReadError(f"Cannot open '{path}' ({exc}). Check its permissions.") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise _too_large(path, w * h, max_pixels)
    return img


def _damaged(path: Path, exc: Exception) -> ImageReadError:
    what = "incomplete (the file is truncated)" if "truncated" in str(exc) else "damaged"
    return ImageReadError(f"'{path}' is a {what} image ({type(exc).__name__}: {exc}). Re-export or re-copy it; "
                          f"the file itself is the problem, not its format.")


def check_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Decode ``path`` fully without converting it; return ``(width, height)``.

    Raises the same typed errors as :func:`load_image` (folder, missing, too large, not an image, truncated or
    damaged), so a batch job can check every input before it starts.
    """
    path = Path(path)
    img = _open_checked(path, max_pixels)
    try:
        with img:
            img.load()
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(path, exc) from exc


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB.

    EXIF orientation is applied; grayscale, palette, 16-bit and RGBA/LA images are converted (alpha is
    composited onto white). Raises :class:`ImageReadError` for a missing file, a folder, a non-image or a
    truncated/damaged file, and :class:`ImageTooLargeError` above ``max_pixels`` (checked from the header,
    before decoding).
    """
    path = Path(path)
    img = _open_checked(path, max_pixels)
    try:
        with img:
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
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(path, exc) from exc


def as_image_list(images, what: str = "images") -> list:
    """``list(images)``, refusing one path or one ``[H, W, C]`` array given alone (which ``list`` would split
    into letters or pixel rows, each then failing with a misleading message)."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray)
                                                                      and images.ndim == 3):
        one = f"path {str(images)!r}" if isinstance(images, (str, bytes, os.PathLike)) else "image"
        raise InputError(f"{what} must be a list with one image per person, got a single {one}. Wrap it in a "
                         f"list: [{'path' if 'path' in one else 'image'}].")
    return list(images)


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
