"""Reading a photo collection: near-duplicate removal, face detection and embedding, portrait crops."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..bench.identities import list_images
from ..errors import ImageReadError
from ..images import load_image, save_image_atomic

__all__ = ["dhash", "hamming", "scan_photos", "crop_box"]

log = logging.getLogger("idglow")


def dhash(image: np.ndarray, size: int = 8) -> int:
    """Difference hash of ``[H, W, 3]`` uint8: ``size * size`` bits, each "is this pixel brighter than its right
    neighbour" on a ``(size + 1) x size`` grey thumbnail. Resizing, recompression and small edits keep it."""
    grey = Image.fromarray(image).convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    px = np.asarray(grey, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def crop_box(bbox, shape: tuple[int, ...], margin: float) -> tuple[int, int, int, int]:
    """A square around the face box grown by ``margin`` times its size on every side, clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    h, w = shape[:2]
    return (max(0, int(cx - side / 2)), max(0, int(cy - side / 2)), min(w, int(cx + side / 2)),
            min(h, int(cy + side / 2)))


def _read_hashes(paths: list[Path], root: Path,
                 skipped: dict[str, tuple[str, str]]) -> list[tuple[Path, int, int]]:
    out = []
    for p in tqdm(paths, desc="hash", unit="img", leave=False):
        try:
            image = load_image(p)
        except ImageReadError as exc:
            skipped[p.relative_to(root).as_posix()] = ("unreadable", str(exc))
            continue
        out.append((p, dhash(image), image.shape[0] * image.shape[1]))
    return out


def scan_photos(photos_dir: Path, out_dir: Path, analyzer, dup_hamming: int, min_face_px: int,
                crop_margin: float) -> tuple[list[dict], list[dict], np.ndarray]:
    """Photos (each ``{"photo", "faces": n, "status": "ok" | "skipped", "code", "reason"}``), faces (``{"face_id",
    "photo", "index", "bbox", "score", "crop"}`` left to right per photo) and their embeddings ``[n, d]``.

    Near-duplicates (hash distance <= ``dup_hamming``) keep the larger photo. Faces narrower than
    ``min_face_px`` are ignored. Crops go to ``out_dir/faces/<face_id>.jpg``."""
    paths = list_images(photos_dir, recursive=True)
    skipped: dict[str, tuple[str, str]] = {}
    hashed = sorted(_read_hashes(paths, photos_dir, skipped), key=lambda t: (-t[2], str(t[0])))
    kept: list[tuple[Path, int]] = []
    for path, h, _ in hashed:
        dup = next((k for k, kh in kept if hamming(h, kh) <= dup_hamming), None)
        if dup is not None:
            skipped[path.relative_to(photos_dir).as_posix()] = (
                "near_duplicate", f"near-duplicate of {dup.relative_to(photos_dir).as_posix()} (kept: the larger)")
        else:
            kept.append((path, h))
    photos, faces, embeddings = [], [], []
    (out_dir / "faces").mkdir(parents=True, exist_ok=True)
    for path, _ in tqdm(sorted(kept, key=lambda t: str(t[0])), desc="faces", unit="img"):
        rel = path.relative_to(photos_dir).as_posix()
        image = load_image(path)
        found = [f for f in analyzer.analyze(image) if f.bbox[2] - f.bbox[0] >= min_face_px]
        photos.append({"photo": rel, "faces": len(found), "status": "ok", "code": "", "reason": ""})
        for i, f in enumerate(found):
            face_id = f"f{len(faces):05d}"
            x1, y1, x2, y2 = crop_box(f.bbox, image.shape, crop_margin)
            save_image_atomic(image[y1:y2, x1:x2], out_dir / "faces" / f"{face_id}.jpg", quality=95)
            faces.append({"face_id": face_id, "photo": rel, "index": i, "bbox": [round(float(v), 1) for v in f.bbox],
                          "score": round(float(f.score), 4), "crop": f"faces/{face_id}.jpg"})
            embeddings.append(np.asarray(f.embedding, np.float32))
    photos += [{"photo": p, "faces": 0, "status": "skipped", "code": c, "reason": r}
               for p, (c, r) in sorted(skipped.items())]
    dim = getattr(analyzer, "embedding_dim", 0)
    emb = np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    log.info("scanned %d photos: %d kept, %d faces", len(paths), len(kept), len(faces))
    return photos, faces, emb
