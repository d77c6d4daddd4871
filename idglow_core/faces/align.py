"""The standard ArcFace 5-point alignment, in numpy (for crops fed to ONNX) and in torch (differentiable).

The transform is the least-squares similarity (rotation, uniform scale, translation; no reflection) that maps
the 5 detected keypoints onto the ``arcface_dst`` template, i.e. Umeyama's method in 2-D. In 2-D it has a
closed form without SVD, which keeps the torch version differentiable everywhere:

    src_c = src - mean(src), dst_c = dst - mean(dst), var = sum |src_c|^2
    a = sum(src_c . dst_c) / var,   b = sum(src_c x dst_c) / var       (x = 2-D cross product)
    M = [[a, -b, tx], [b, a, ty]],  (tx, ty) = mean(dst) - [[a, -b], [b, a]] @ mean(src)

This is the same matrix as insightface's ``estimate_norm`` (scikit-image ``SimilarityTransform``).
``M`` is the 2x3 pixel-space matrix that ``cv2.warpAffine`` and ``kornia.geometry.transform.warp_affine``
take (output pixel = M @ input pixel).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from ..errors import InputError

__all__ = ["ARCFACE_DST", "arcface_template", "estimate_similarity", "estimate_similarity_torch",
           "norm_crop"]

# insightface.utils.face_align.arcface_dst: left eye, right eye, nose, left / right mouth corner (112x112).
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def arcface_template(size: int = 112) -> np.ndarray:
    """``[5, 2]`` float32 template for a ``size`` x ``size`` crop, scaled as insightface does
    (multiples of 128 get the 128-px layout with an 8-px x shift; anything else is scaled from 112)."""
    if size <= 0:
        raise InputError(f"Crop size must be positive, got {size}. ArcFace models use 112.")
    if size % 128 == 0:
        ratio, diff_x = size / 128.0, 8.0 * size / 128.0
    else:
        ratio, diff_x = size / 112.0, 0.0
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return dst.astype(np.float32)


def _check_points(src_shape: tuple, dst_shape: tuple) -> None:
    if len(src_shape) < 2 or src_shape[-1] != 2 or src_shape[-2] < 2 or tuple(dst_shape[-2:]) != src_shape[-2:]:
        raise InputError(f"Keypoints must be [..., P, 2] with P >= 2 matching the template, got source "
                         f"{tuple(src_shape)} and template {tuple(dst_shape)}. Pass the 5 ArcFace points.")


def estimate_similarity(src_kps: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity from ``src_kps`` ``[P, 2]`` to ``dst`` ``[P, 2]`` (default: the 112 px
    ArcFace template). Returns ``M``: ``[2, 3]`` float64, so that ``dst ~= src @ M[:, :2].T + M[:, 2]``."""
    src = np.asarray(src_kps, dtype=np.float64)
    dst = arcface_template(112).astype(np.float64) if dst is None else np.asarray(dst, dtype=np.float64)
    _check_points(src.shape, dst.shape)
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    var = float((src_c ** 2).sum())
    if var < 1e-12:
        raise InputError("All keypoints coincide, so no alignment can be estimated. Check the detector output.")
    a = float((src_c * dst_c).sum()) / var
    b = float((src_c[:, 0] * dst_c[:, 1] - src_c[:, 1] * dst_c[:, 0]).sum()) / var
    rot = np.array([[a, -b], [b, a]])
    t = dst.mean(0) - rot @ src.mean(0)
    return np.concatenate([rot, t[:, None]], axis=1)


def estimate_similarity_torch(src_kps: torch.Tensor, dst: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Batched, differentiable version of :func:`estimate_similarity`.

    src_kps: ``[N, P, 2]`` (or ``[P, 2]``); dst: ``[P, 2]`` or ``[N, P, 2]`` (default: the 112 px template).
    Returns ``[N, 2, 3]`` (or ``[2, 3]``) in ``src_kps``'s dtype and device.
    """
    squeeze = src_kps.dim() == 2
    src = src_kps[None] if squeeze else src_kps
    if dst is None:
        dst = arcface_template(112)
    dst = torch.as_tensor(dst, dtype=src.dtype, device=src.device)
    dst = dst.expand(src.shape[0], *dst.shape[-2:]) if dst.dim() == 2 else dst
    _check_points(tuple(src.shape), tuple(dst.shape))
    src_m, dst_m = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    src_c, dst_c = src - src_m, dst - dst_m
    var = (src_c ** 2).sum((1, 2)).clamp_min(1e-12)
    a = (src_c * dst_c).sum((1, 2)) / var
    b = (src_c[..., 0] * dst_c[..., 1] - src_c[..., 1] * dst_c[..., 0]).sum(1) / var
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # [N, 2, 2]
    t = dst_m.squeeze(1) - (rot @ src_m.squeeze(1)[..., None]).squeeze(-1)     # [N, 2]
    matrix = torch.cat([rot, t[..., None]], dim=-1)
    return matrix[0] if squeeze else matrix


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Aligned ``[size, size, C]`` crop of ``image`` ``[H, W, C]`` uint8 (any channel order is kept),
    as insightface's ``face_align.norm_crop``: similarity to the template, bilinear, black border."""
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise InputError(f"norm_crop expects an [H, W, C] array, got "
                         f"{getattr(image, 'shape', type(image).__name__)}.")
    matrix = estimate_similarity(kps, arcface_template(size))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)
