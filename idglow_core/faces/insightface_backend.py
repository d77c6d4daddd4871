"""insightface backend: buffalo_l's SCRFD detector (``det_10g.onnx``) and ArcFace (``w600k_r50.onnx``) only.

The two files are loaded with ``insightface.model_zoo.get_model(path, providers=...)`` (not ``FaceAnalysis``,
which globs and runs every ``.onnx`` in the folder). Works with insightface 0.7.3 and 2.x. The weights are
not shipped by any package: the user downloads ``buffalo_l.zip`` from the insightface model zoo
(non-commercial research licence) and unzips it into a folder that holds both files.

Loaded models are cached per (file, providers[, threshold]); nothing about a cached model is changed after it
is built: the detection size is passed on every call, and the score threshold is fixed when the detector is
created (insightface 0.7.3 reads it from the model).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DependencyError, InputError, ModelNotFoundError, ModelFormatError
from ..images import to_rgb_uint8
from .align import norm_crop
from .base import Face, sort_left_to_right

__all__ = ["InsightFaceAnalyzer", "BUFFALO_FILES", "find_buffalo_dir", "default_model_dirs",
           "resolve_providers"]

logger = logging.getLogger("idglow")

BUFFALO_FILES = ("det_10g.onnx", "w600k_r50.onnx")
_GET_IT = ("Download buffalo_l.zip from the insightface model zoo "
           "(https://github.com/deepinsight/insightface/releases, 'model-zoo'; non-commercial research use only) "
           "and unzip it so that e.g. <ComfyUI>/models/insightface/models/buffalo_l/det_10g.onnx exists, or use "
           "backend='dlib'.")
_PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def default_model_dirs() -> list[Path]:
    """Folders that ``backend='auto'`` looks at when no folder is given: ``$IDGLOW_INSIGHTFACE_DIR``, then
    insightface's own ``~/.insightface/models/buffalo_l``."""
    dirs = [Path(os.environ["IDGLOW_INSIGHTFACE_DIR"])] if os.environ.get("IDGLOW_INSIGHTFACE_DIR") else []
    return dirs + [Path.home() / ".insightface" / "models" / "buffalo_l"]


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BUFFALO_FILES)


def find_buffalo_dir(model_dir: str | os.PathLike) -> Path:
    """Return the folder holding ``det_10g.onnx`` and ``w600k_r50.onnx``.

    ``model_dir`` may be that folder, ComfyUI's ``models/insightface`` (then ``models/buffalo_l`` or
    ``buffalo_l`` inside it is used) or ``models/insightface/models``. Raises :class:`ModelNotFoundError`
    naming the expected files, and pointing at a doubly nested ``buffalo_l/buffalo_l`` when that is the cause.
    """
    root = Path(model_dir).expanduser()
    candidates = [root, root / "models" / "buffalo_l"]
    if root.name != "buffalo_l":  # buffalo_l/buffalo_l is the unzip-into-itself mistake, reported below
        candidates.append(root / "buffalo_l")
    for folder in candidates:
        if _has_files(folder):
            return folder
    for folder in candidates[:2]:
        if _has_files(folder / "buffalo_l"):
            raise ModelNotFoundError(
                f"Found {' and '.join(BUFFALO_FILES)} in '{folder / 'buffalo_l'}', one folder too deep: the zip "
                f"was unzipped into a folder of the same name. Move the .onnx files up into '{folder}' (or pass "
                f"'{folder / 'buffalo_l'}' as the model folder).")
    present = [str(f / n) for f in candidates for n in BUFFALO_FILES if (f / n).is_file()]
    where = "', '".join(str(f) for f in candidates)
    raise ModelNotFoundError(
        f"insightface model files {' and '.join(BUFFALO_FILES)} were not found together in any of '{where}'"
        f"{' (found only ' + ', '.join(present) + ')' if present else ''}. {_GET_IT}")


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """onnxruntime providers: ``None`` = CUDA when available, else CPU; ``'cpu'``/``'cuda'`` shorthands or
    full provider names. CPU is always appended as the fallback."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DependencyError(f"The insightface backend needs onnxruntime ({exc}). "
                              f"`pip install onnxruntime` (or onnxruntime-gpu).") from exc
    available = ort.get_available_providers()
    if providers is None:
        names = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        names = [providers] if isinstance(providers, str) else list(providers)
        names = [_PROVIDER_ALIASES.get(n.lower(), n) for n in names]
        unknown = [n for n in names if n not in ort.get_all_providers()]
        if unknown:
            raise InputError(f"Unknown onnxruntime provider(s) {unknown}. Use 'cpu', 'cuda' or names from "
                             f"onnxruntime.get_all_providers(); available here: {available}.")
        for name in names:
            if name not in available:
                logger.warning("onnxruntime provider %s is not available here (%s); falling back to CPU.",
                               name, available)
        names = [n for n in names if n in available]
    return names + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in names else [])


def _import_model_zoo():
    try:
        from insightface import model_zoo
    except ImportError as exc:
        raise DependencyError(f"backend='insightface' needs the insightface package ({exc}). Install it "
                              f"(`pip install insightface`, 0.7.3 or 2.x) or use backend='dlib'.") from exc
    return model_zoo


def _get_model(path: str, providers: tuple[str, ...]):
    model = _import_model_zoo().get_model(path, providers=list(providers))
    if model is None:
        raise ModelFormatError(f"insightface could not recognise '{path}' as a detection or recognition model. "
                               f"Replace it with the file from buffalo_l.zip.")
    return model


@functools.lru_cache(maxsize=4)
def _load_detector(path: str, mtime: float, providers: tuple[str, ...], det_thresh: float):
    model = _get_model(path, providers)
    if getattr(model, "taskname", None) != "detection":  # SCRFD in insightface 2.x, RetinaFace in 0.7.3
        raise ModelFormatError(f"'{path}' is a {type(model).__name__}, not an SCRFD detector. It should be "
                               f"buffalo_l's det_10g.onnx.")
    model.prepare(0, det_thresh=det_thresh, nms_thresh=0.4)  # ctx_id 0: keep the providers we chose
    return model


@functools.lru_cache(maxsize=4)
def _load_recognizer(path: str, mtime: float, providers: tuple[str, ...]):
    model = _get_model(path, providers)
    if getattr(model, "taskname", None) != "recognition":
        raise ModelFormatError(f"'{path}' is a {type(model).__name__}, not an ArcFace recogniser. It should "
                               f"be buffalo_l's w600k_r50.onnx.")
    return model


class InsightFaceAnalyzer:
    """:class:`FaceAnalyzer` on buffalo_l. ``det_size``: square detector input (the image is letterboxed
    into it, so detection already runs at a fixed working size; keypoints come back in full-resolution pixels
    and the crop is taken from the full image); ``det_thresh``: SCRFD score threshold in [0, 1]."""

    name = "insightface"

    def __init__(self, model_dir: str | os.PathLike, providers: str | Sequence[str] | None = None,
                 det_size: int = 640, det_thresh: float = 0.5):
        if det_size <= 0 or det_size % 32:
            raise InputError(f"det_size must be a positive multiple of 32 (SCRFD strides), got {det_size}. "
                             f"Use 640 (default) or 320 for speed.")
        if not 0.0 <= det_thresh <= 1.0:
            raise InputError(f"det_thresh is an SCRFD probability in [0, 1], got {det_thresh}. Use 0.5.")
        self.folder = find_buffalo_dir(model_dir)
        self.providers = resolve_providers(providers)
        self.det_size, self.det_thresh = int(det_size), float(det_thresh)
        det_path, rec_path = (str(self.folder / name) for name in BUFFALO_FILES)
        self._det = _load_detector(det_path, os.path.getmtime(det_path), tuple(self.providers), self.det_thresh)
        self._rec = _load_recognizer(rec_path, os.path.getmtime(rec_path), tuple(self.providers))
        self.embedding_dim = int(self._rec.session.get_outputs()[0].shape[1])

    def __reduce__(self):  # worker processes rebuild it from its settings (models are loaded per process)
        return InsightFaceAnalyzer, (str(self.folder), self.providers, self.det_size, self.det_thresh)

    def __repr__(self) -> str:
        return (f"InsightFaceAnalyzer('{self.folder}', providers={self.providers}, det_size={self.det_size}, "
                f"det_thresh={self.det_thresh})")

    def analyze(self, image) -> list[Face]:
        """image: ``[H, W, 3]`` uint8 RGB (grayscale, RGBA, float [0, 1] and PIL are converted).
        Returns every face, left to right, with unit ``[embedding_dim]`` embeddings."""
        bgr = np.ascontiguousarray(to_rgb_uint8(image)[:, :, ::-1])
        dets, kpss = self._det.detect(bgr, input_size=(self.det_size, self.det_size), max_num=0)
        keep = [i for i in range(len(dets)) if dets[i, 4] >= self.det_thresh]
        if not keep:
            return []
        if kpss is None:
            raise ModelFormatError(f"The detector in '{self.folder}' gives no keypoints; buffalo_l's "
                                   f"det_10g.onnx (SCRFD with 5 keypoints) is required.")
        crops = [norm_crop(bgr, kpss[i], self._rec.input_size[0]) for i in keep]
        feats = np.asarray(self._rec.get_feat(crops), dtype=np.float32).reshape(len(keep), -1)
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        faces = [Face(bbox=dets[i, :4].astype(np.float32), kps=kpss[i].astype(np.float32),
                      score=float(dets[i, 4]), embedding=feats[j]) for j, i in enumerate(keep)]
        return sort_left_to_right(faces)
