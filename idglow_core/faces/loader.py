"""Choosing a backend (:func:`load_analyzer`) and picking reference faces (:func:`reference_faces`)."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from ..errors import InputError, ModelNotFoundError
from ..images import as_image_list, load_image
from .base import Face, FaceAnalyzer, pick_face
from .insightface_backend import default_model_dirs, find_buffalo_dir

__all__ = ["load_analyzer", "reference_faces", "BACKENDS"]

logger = logging.getLogger("idglow")

BACKENDS = ("auto", "dlib", "insightface")


def _find_configured(model_dir: str | os.PathLike | None):
    """The buffalo_l folder for ``auto``: the given folder, else the default places; ``None`` if absent."""
    for folder in ([model_dir] if model_dir is not None else default_model_dirs()):
        try:
            return find_buffalo_dir(folder)
        except ModelNotFoundError as exc:  # a folder the caller named deserves a visible reason
            (logger.warning if model_dir is not None else logger.debug)(
                "Not using insightface models from %s: %s", folder, exc)
    return None


def load_analyzer(backend: str = "auto", model_dir: str | os.PathLike | None = None,
                  providers: str | Sequence[str] | None = None, det_size: int = 640,
                  det_thresh: float | None = None, upsample: int = 1) -> FaceAnalyzer:
    """Build a face analyzer.

    backend: ``"insightface"`` (buffalo_l in ``model_dir``; paper-faithful, 512-d), ``"dlib"`` (offline,
    weights from PyPI, 128-d) or ``"auto"`` (insightface when ``model_dir`` - or ``$IDGLOW_INSIGHTFACE_DIR``,
    or ``~/.insightface/models/buffalo_l`` when ``model_dir`` is None - holds both model files, else dlib).
    providers: onnxruntime providers for insightface (None = CUDA if available, else CPU; or 'cpu'/'cuda').
    det_size: insightface detector input size. upsample: dlib HOG upsampling count.
    det_thresh: detector score threshold on the backend's own scale; None = its default (insightface 0.5,
    dlib 0.0, since dlib HOG scores of real faces start around 0.3).
    """
    if backend not in BACKENDS:
        raise InputError(f"Unknown face backend '{backend}'. Choose one of {BACKENDS}.")
    if backend == "auto":
        folder = _find_configured(model_dir)
        backend = "insightface" if folder is not None else "dlib"
        logger.info("Face backend 'auto' chose %s%s", backend,
                    f" (models in {folder})" if folder is not None else " (no insightface buffalo_l folder found)")
        model_dir = folder if folder is not None else model_dir
    if backend == "insightface":
        from .insightface_backend import InsightFaceAnalyzer
        if model_dir is None:
            model_dir = _find_configured(None)
            if model_dir is None:
                raise ModelNotFoundError(
                    f"backend='insightface' needs a model folder: pass model_dir= or set IDGLOW_INSIGHTFACE_DIR. "
                    f"Looked in {[str(d) for d in default_model_dirs()]} for det_10g.onnx and w600k_r50.onnx. "
                    f"Download buffalo_l.zip from the insightface model zoo (non-commercial licence).")
        return InsightFaceAnalyzer(model_dir, providers=providers, det_size=det_size,
                                   det_thresh=0.5 if det_thresh is None else det_thresh)
    from .dlib_backend import DlibAnalyzer
    return DlibAnalyzer(det_thresh=0.0 if det_thresh is None else det_thresh, upsample=upsample)


def reference_faces(analyzer: FaceAnalyzer, images: Sequence, indices: Sequence[int | None] | None = None
                    ) -> list[Face]:
    """One face per reference image: the largest, or ``indices[i]`` (left-to-right order) when given.

    images: k images, each ``[H, W, 3]`` uint8 RGB (or anything ``images.to_rgb_uint8`` accepts) or a file path.
    Raises :class:`NoFaceError` naming the reference ("reference image 2 of 3") that has no face.
    """
    images = as_image_list(images, "reference images")
    if not images:
        raise InputError("No reference images were given. Pass one portrait per person.")
    if indices is not None and len(indices) != len(images):
        raise InputError(f"Got {len(indices)} face indices for {len(images)} reference images. Give one index "
                         f"(or None for the largest face) per image.")
    faces = []
    for i, image in enumerate(images):
        label = f"reference image {i + 1} of {len(images)}"
        if isinstance(image, (str, os.PathLike)):
            label += f" ('{image}')"
            image = load_image(image)
        found = analyzer.analyze(image)
        faces.append(pick_face(found, None if indices is None else indices[i], label=label))
    return faces
