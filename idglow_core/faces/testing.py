"""Tiny stand-ins for buffalo_l, for tests and offline demos (seconds to build, no download).

``write_tiny_buffalo(folder)`` writes ``det_10g.onnx`` and ``w600k_r50.onnx`` that insightface loads with
the same routing as the real files:

- the detector has SCRFD's 9-output layout (3 strides x score / bbox / kps, 2 anchors per location) and
  *detects bright squares*: a stride-32 cell whose mean brightness is near white scores ~0.99, everything
  else ~0.007; its box is the cell and its 5 keypoints sit where a face's would. So a dark image with white
  32x32 squares on the 32-px grid gives one "face" per square, with known boxes.
- the recogniser is a randomly initialised tiny iresnet (random BatchNorm statistics), 512-d output.

Requires torch's ONNX exporter (legacy, ``dynamo=False``) and the ``onnx`` package.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .iresnet import IResNet, iresnet_tiny

__all__ = ["BrightSquareSCRFD", "export_fake_scrfd", "export_tiny_arcface", "write_tiny_buffalo",
           "randomize_batchnorm"]

# keypoints inside the cell, in stride units from its top-left corner (insightface's anchor point)
_CELL_KPS = (0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8)


class BrightSquareSCRFD(nn.Module):
    """``[1, 3, H, W]`` (RGB - 127.5) / 128 -> 9 tensors: scores ``[K_s, 1]``, boxes ``[K_s, 4]`` and
    keypoints ``[K_s, 10]`` (distances in stride units) for strides 8, 16, 32; ``K_s = 2 * H/s * W/s``."""

    strides = (8, 16, 32)

    def __init__(self):
        super().__init__()
        self.register_buffer("cell_kps", torch.tensor(_CELL_KPS).view(1, 10, 1, 1))

    def forward(self, x: torch.Tensor):
        gray = x.mean(1, keepdim=True)
        scores, boxes, kps = [], [], []
        for stride in self.strides:
            g = F.avg_pool2d(gray, stride)                                  # [1, 1, H/s, W/s]
            logit = 10.0 * (g - 0.5) if stride == 32 else torch.full_like(g, -10.0)
            per_loc = torch.cat([torch.sigmoid(logit), torch.zeros_like(g).expand(-1, 2, -1, -1),
                                 torch.ones_like(g).expand(-1, 2, -1, -1),  # box: l=t=0, r=b=1 cell
                                 torch.ones_like(g).expand(-1, 10, -1, -1) * self.cell_kps],
                                dim=1)                                      # [1, 15, H/s, W/s]
            rows = per_loc.permute(0, 2, 3, 1).reshape(-1, 1, 15).expand(-1, 2, -1).reshape(-1, 15)
            scores.append(rows[:, :1])
            boxes.append(rows[:, 1:5])
            kps.append(rows[:, 5:])
        return (*scores, *boxes, *kps)


def export_fake_scrfd(path: str | Path) -> Path:
    """Write :class:`BrightSquareSCRFD` as an ONNX file with a dynamic spatial input ``input.1``."""
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in BrightSquareSCRFD.strides]
    torch.onnx.export(BrightSquareSCRFD().eval(), (torch.zeros(1, 3, 128, 128),), str(path), dynamo=False,
                      opset_version=17, input_names=["input.1"], output_names=names,
                      dynamic_axes={"input.1": {2: "h", 3: "w"}, **{n: {0: "k"} for n in names}})
    return Path(path)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and bias, so a test model is not near-identity."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
    return model


def export_tiny_arcface(path: str | Path, seed: int = 0) -> IResNet:
    """Write a random tiny iresnet as an insightface-style ArcFace ONNX file (input ``input.1``
    ``[n, 3, 112, 112]``, output ``output`` ``[n, 512]``); returns the torch model (eval)."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(iresnet_tiny(), seed).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=17,
                      input_names=["input.1"], output_names=["output"],
                      dynamic_axes={"input.1": {0: "n"}, "output": {0: "n"}})
    return model


def write_tiny_buffalo(folder: str | Path, seed: int = 0) -> Path:
    """Write ``det_10g.onnx`` (bright-square SCRFD) and ``w600k_r50.onnx`` (tiny iresnet) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    export_fake_scrfd(folder / "det_10g.onnx")
    export_tiny_arcface(folder / "w600k_r50.onnx", seed)
    return folder
