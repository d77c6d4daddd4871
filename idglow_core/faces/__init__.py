"""Face detection, alignment and embedding, plus the differentiable ArcFace path for the ID loss.

Stable API (import from ``idglow_core.faces``)::

    from idglow_core.faces import load_analyzer, reference_faces, pick_face, Face

    analyzer = load_analyzer("auto", model_dir=None, providers=None, det_size=640, det_thresh=None)
    faces = analyzer.analyze(rgb_uint8)            # list[Face], left to right by box centre x
    faces[0].bbox  # [4] (x1, y1, x2, y2)   .kps [5, 2] ArcFace points   .score   .embedding [d], unit L2
    refs = reference_faces(analyzer, [img1, img2]) # largest face of each; NoFaceError "reference image 2 of 2"
    cos = float(refs[0].embedding @ refs[1].embedding)

Backends (``analyzer.name``, ``analyzer.embedding_dim``):

- ``"insightface"``: buffalo_l ``det_10g.onnx`` (SCRFD) + ``w600k_r50.onnx`` (ArcFace, 512-d) from
  ``model_dir`` (the folder itself, or ComfyUI's ``models/insightface`` holding ``models/buffalo_l`` or
  ``buffalo_l``). Only those two files are loaded. Missing files -> :class:`ModelNotFoundError`.
- ``"dlib"``: HOG detector + 68-point landmarks + dlib's 128-d ResNet (``dlib-bin`` +
  ``face-recognition-models``); offline. Same person: cosine > :data:`DLIB_SAME_PERSON_COSINE` (dlib's L2 < 0.6).
- ``"auto"``: insightface when a buffalo_l folder is given or found (``$IDGLOW_INSIGHTFACE_DIR``,
  ``~/.insightface/models/buffalo_l``), else dlib; the choice is logged.

Large images: above ``base.DETECT_MAX_SIDE`` (2048 px) dlib detects on a downscaled copy and maps the boxes
back; landmarks, alignment and embeddings always use the full-resolution image.

Many files (``idglow_core.faces.batch.FileAnalyzer``): check or analyse each file once, in order, optionally in
``workers`` spawned CPU processes (analyzers pickle as their settings).

Alignment (``idglow_core.faces.align``): ``ARCFACE_DST``, ``estimate_similarity(kps, dst) -> [2, 3]``,
``estimate_similarity_torch(kps[N, 5, 2]) -> [N, 2, 3]`` (differentiable), ``norm_crop(img, kps, 112)``.

Differentiable ID path (``idglow_core.faces.arcface``; imported lazily, it needs kornia)::

    from idglow_core.faces import ArcFace, embed_faces_differentiable
    arcface = ArcFace.from_onnx(folder / "w600k_r50.onnx")         # frozen, eval, torch module
    emb = embed_faces_differentiable(images, kps, image_index, arcface)
    # images [B, 3, H, W] float in [0, 1] (grad flows), kps [N, 5, 2] (detected without grad),
    # image_index [N] long -> emb [N, 512], unit L2

Tests reuse ``idglow_core.faces.testing.write_tiny_buffalo(folder)`` (tiny random det_10g.onnx +
w600k_r50.onnx that insightface loads and runs).
"""
from __future__ import annotations

from .base import Face, FaceAnalyzer, pick_face, sort_left_to_right
from .dlib_backend import DLIB_SAME_PERSON_COSINE
from .loader import BACKENDS, load_analyzer, reference_faces

__all__ = ["Face", "FaceAnalyzer", "pick_face", "sort_left_to_right", "load_analyzer", "reference_faces",
           "BACKENDS", "DLIB_SAME_PERSON_COSINE", "ArcFace", "embed_faces_differentiable", "crop_faces"]

_LAZY = {"ArcFace", "embed_faces_differentiable", "crop_faces"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import arcface
        return getattr(arcface, name)
    raise AttributeError(f"module 'idglow_core.faces' has no attribute '{name}'")
