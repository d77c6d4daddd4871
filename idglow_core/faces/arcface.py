"""Differentiable ArcFace for the ID loss: keypoints -> similarity (torch) -> kornia crop -> ArcFace -> unit embedding.

Usage in a trainer (faces are detected without grad first, e.g. with ``load_analyzer(...).analyze``)::

    arcface = ArcFace.from_onnx("<buffalo_l>/w600k_r50.onnx").to(device)
    emb = embed_faces_differentiable(x0_hat_rgb01, kps, image_index, arcface)   # [N, 512], grad -> image

The crop equals insightface's ``norm_crop`` (cv2) to within uint8 rounding and the embedding equals
onnxruntime's on the same crop (cosine > 0.9999), so the training loss and the FaceSim metric agree.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DependencyError, InputError
from .align import arcface_template, estimate_similarity_torch
from .onnx_graph import OnnxGraphModule, load_onnx

__all__ = ["ArcFace", "crop_faces", "embed_faces_differentiable"]

logger = logging.getLogger("idglow")


def _is_mxnet_style(model_proto) -> bool:
    """insightface's ArcFaceONNX rule: a Sub and a Mul among the first 8 nodes mean the graph normalises
    itself (MXNet export) and takes raw 0..255 input; otherwise the input is (x - 127.5) / 127.5."""
    names = [n.name for n in model_proto.graph.node[:8]]
    return (any(n.startswith(("Sub", "_minus")) for n in names)
            and any(n.startswith(("Mul", "_mul")) for n in names))


class ArcFace(nn.Module):
    """Frozen ArcFace. ``forward(faces)``: ``[N, 3, S, S]`` aligned RGB in [0, 1] -> ``[N, D]`` unit L2.

    backbone: maps normalised input to raw features; ``mean``/``std`` act on [0, 1] pixels
    (``(x - 0.5) / 0.5`` for w600k_r50 and arcface_torch models).
    """

    def __init__(self, backbone: nn.Module, input_size: int = 112, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        self.backbone, self.input_size, self.mean, self.std = backbone, int(input_size), float(mean), float(std)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "ArcFace":
        """Always stays in eval mode: BatchNorm statistics are part of the pretrained model."""
        return super().train(False)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ArcFace":
        """Read ``w600k_r50.onnx`` (or any iresnet ArcFace export) into a torch module (CPU, float32)."""
        proto = load_onnx(path)
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        size = dims[2] if len(dims) == 4 and dims[2] > 0 else 112
        mxnet = _is_mxnet_style(proto)
        backbone = OnnxGraphModule(proto, source=f"'{path}'")
        logger.info("Loaded ArcFace from %s (%d-px input, %s normalisation)", path, size,
                    "0..255" if mxnet else "(x - 0.5) / 0.5")
        return cls(backbone, size, mean=0.0, std=1.0 / 255.0) if mxnet else cls(backbone, size)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 4 or faces.shape[1] != 3 or tuple(faces.shape[2:]) != (self.input_size,) * 2:
            raise InputError(f"ArcFace expects aligned crops [N, 3, {self.input_size}, {self.input_size}] RGB in "
                             f"[0, 1], got {tuple(faces.shape)}. Use crop_faces() first.")
        feats = self.backbone((faces - self.mean) / self.std)
        return F.normalize(feats.flatten(1), dim=-1)


def _warp_affine():
    try:
        from kornia.geometry.transform import warp_affine
    except ImportError as exc:
        raise DependencyError(f"The differentiable face crop needs kornia ({exc}). `pip install kornia`.") from exc
    return warp_affine


def crop_faces(images: torch.Tensor, kps: torch.Tensor, image_index: torch.Tensor, size: int = 112
               ) -> torch.Tensor:
    """Differentiable ArcFace-aligned crops.

    images: ``[B, 3, H, W]`` float in [0, 1]; kps: ``[N, 5, 2]`` pixel keypoints (ArcFace order);
    image_index: ``[N]`` long, which image each face is in. Returns ``[N, 3, size, size]``.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"images must be [B, 3, H, W] RGB in [0, 1], got {tuple(images.shape)}.")
    if kps.dim() != 3 or tuple(kps.shape[1:]) != (5, 2):
        raise InputError(f"kps must be [N, 5, 2] (the 5 ArcFace points per face), got {tuple(kps.shape)}.")
    image_index = torch.as_tensor(image_index, dtype=torch.long, device=images.device).reshape(-1)
    if image_index.numel() != kps.shape[0]:
        raise InputError(f"image_index has {image_index.numel()} entries for {kps.shape[0]} faces; give one "
                         f"image index per face.")
    if kps.shape[0] and (image_index.min() < 0 or image_index.max() >= images.shape[0]):
        raise InputError(f"image_index values must lie in 0..{images.shape[0] - 1}, got "
                         f"{image_index.tolist()}.")
    kps = kps.to(device=images.device, dtype=images.dtype)
    matrix = estimate_similarity_torch(kps, arcface_template(size))   # [N, 2, 3], output px = M @ input px
    return _warp_affine()(images[image_index], matrix, dsize=(size, size), mode="bilinear",
                          padding_mode="zeros", align_corners=True)


def embed_faces_differentiable(images: torch.Tensor, kps: torch.Tensor, image_index: torch.Tensor,
                               arcface: ArcFace) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] + ``[N, 5, 2]`` keypoints + ``[N]`` image indices -> ``[N, D]`` unit
    ArcFace embeddings, differentiable with respect to ``images`` (and ``kps``)."""
    crops = crop_faces(images, kps, image_index, arcface.input_size)
    return arcface(crops)
