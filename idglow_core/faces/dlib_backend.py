"""dlib backend: real trained weights from PyPI (``dlib-bin`` + ``face-recognition-models``), fully offline.

- detection: dlib's HOG + linear-SVM frontal face detector (compiled into dlib), ``upsample`` times;
- keypoints: the 68-point predictor reduced to the 5 ArcFace points (eye centres = mean of points 36-41 and
  42-47, nose tip 30, mouth corners 48 and 54);
- embedding: dlib's 128-d ResNet descriptor computed on dlib's *own* 5-point alignment (feeding it an
  ArcFace-aligned chip compresses the same/different gap), then L2-normalised.

dlib descriptors are not zero-centred, so cosines sit high. dlib's rule "same person if raw L2 < 0.6" is,
for raw descriptor norms n (measured 1.36-1.59), cosine > 1 - 0.18 / n^2 = 0.905-0.929; IdGlow uses 0.92
(n = 1.5), see :data:`DLIB_SAME_PERSON_COSINE`. Measured on the test photos: same person 0.944-0.968,
Obama-Biden 0.807-0.823, the 15 pairs of different people in insightface's t1.jpg at most 0.906.
The 68-point model is trained on iBUG 300-W, whose licence excludes commercial use.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..errors import DependencyError, ModelNotFoundError
from ..images import to_rgb_uint8
from .base import DETECT_MAX_SIDE, Face, downscale_for_detection, sort_left_to_right

__all__ = ["DlibAnalyzer", "DLIB_SAME_PERSON_COSINE", "dlib_model_dir"]

logger = logging.getLogger("idglow")

DLIB_SAME_PERSON_COSINE = 0.92  # raw L2 0.6 at descriptor norm 1.5: 1 - 0.6**2 / (2 * 1.5**2)
_FILES = {"sp68": "shape_predictor_68_face_landmarks.dat", "sp5": "shape_predictor_5_face_landmarks.dat",
          "rec": "dlib_face_recognition_resnet_model_v1.dat"}
_INSTALL = "pip install dlib-bin face-recognition-models"


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise DependencyError(f"The dlib face backend needs dlib ({exc}). Install the prebuilt wheel: "
                              f"`{_INSTALL}` (no compiler needed), or configure an insightface buffalo_l "
                              f"folder and use backend='insightface'.") from exc
    return dlib


def dlib_model_dir() -> Path:
    """Folder of the ``.dat`` files shipped by ``face-recognition-models`` (found without importing it:
    its ``__init__`` needs ``pkg_resources``, which setuptools >= 81 no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"The dlib face backend needs the package face-recognition-models, which ships "
                              f"the trained .dat files. Install it: `{_INSTALL}`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    missing = [name for name in _FILES.values() if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"face-recognition-models is installed but {missing} are missing from "
                                 f"'{folder}'. Reinstall it: `pip install --force-reinstall "
                                 f"face-recognition-models`.")
    return folder


@functools.lru_cache(maxsize=1)
def _load_models() -> tuple:
    """(detector, 68-point predictor, 5-point predictor, recogniser); loaded once (~1.3 s), read-only."""
    dlib = _import_dlib()
    folder = dlib_model_dir()
    logger.info("Loading dlib face models from %s", folder)
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(folder / _FILES["sp68"])),
            dlib.shape_predictor(str(folder / _FILES["sp5"])),
            dlib.face_recognition_model_v1(str(folder / _FILES["rec"])))


def _arcface_points(shape) -> np.ndarray:
    """68 dlib landmarks -> ``[5, 2]`` float32 ArcFace keypoints (left eye, right eye, nose, mouth L/R)."""
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]).astype(np.float32)


class DlibAnalyzer:
    """:class:`FaceAnalyzer` on dlib. ``det_thresh`` is on the HOG score scale (0 keeps every detection;
    real faces score about 0.3-3); ``upsample`` doubles the image that many times to find small faces;
    ``detect_max_side``: images with a longer side are downscaled to it for detection only (landmarks and
    embeddings use full resolution). Pickles as its settings (worker processes reload the models)."""

    name = "dlib"
    embedding_dim = 128

    def __init__(self, det_thresh: float = 0.0, upsample: int = 1, num_jitters: int = 0,
                 detect_max_side: int = DETECT_MAX_SIDE):
        self.det_thresh = float(det_thresh)
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self.detect_max_side = int(detect_max_side)
        self._dlib = _import_dlib()
        self._models = _load_models()

    def __reduce__(self):
        return DlibAnalyzer, (self.det_thresh, self.upsample, self.num_jitters, self.detect_max_side)

    def __repr__(self) -> str:
        return f"DlibAnalyzer(det_thresh={self.det_thresh}, upsample={self.upsample})"

    def analyze(self, image) -> list[Face]:
        """image: ``[H, W, 3]`` uint8 RGB (grayscale, RGBA, float [0, 1] and PIL are converted).
        Returns every face, left to right, with 128-d unit embeddings."""
        rgb = to_rgb_uint8(image)
        detector, sp68, sp5, rec = self._models
        small, scale = downscale_for_detection(rgb, self.detect_max_side)
        rects, scores, _ = detector.run(small, self.upsample, self.det_thresh)
        faces = []
        for rect, score in zip(rects, scores):
            if scale != 1.0:  # back to full-resolution pixels for the landmarks and the descriptor's chip
                rect = self._dlib.rectangle(*(int(round(v / scale)) for v in
                                              (rect.left(), rect.top(), rect.right(), rect.bottom())))
            desc = np.asarray(rec.compute_face_descriptor(rgb, sp5(rgb, rect), self.num_jitters),
                              dtype=np.float32)
            bbox = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
            faces.append(Face(bbox=bbox, kps=_arcface_points(sp68(rgb, rect)), score=float(score),
                              embedding=desc / max(float(np.linalg.norm(desc)), 1e-12)))
        return sort_left_to_right(faces)
