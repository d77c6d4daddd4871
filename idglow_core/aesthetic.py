"""LAION improved aesthetic predictor (the paper's "Aes" column): CLIP ViT-L/14 image embedding -> MLP -> score.

Files the user provides (no registry package ships them):

- the head ``sac+logos+ava1-l14-linearMSE.pth`` (a plain state dict, keys ``layers.{0,2,4,6,7}.{weight,bias}``;
  a ``.safetensors`` file with the same keys works too), loaded with ``torch.load(weights_only=True)``;
- a CLIP ViT-L/14 folder in Hugging Face format (``openai/clip-vit-large-patch14``), read with transformers'
  ``CLIPVisionModelWithProjection``; its L2-normalised ``image_embeds`` equal OpenAI CLIP's ``encode_image``.

Preprocessing follows the reference ``simple_inference.py``: resize the short side to the CLIP image size
(bicubic), centre crop, scale to [0, 1], normalise with CLIP's mean and std. It is written in torch, so scores
are differentiable with respect to the pixels.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DependencyError, ModelFormatError, ModelNotFoundError
from .images import to_rgb_uint8

__all__ = ["AestheticMLP", "AestheticScorer", "load_mlp", "preprocess_for_clip", "MLP_FILENAMES"]

log = logging.getLogger("idglow")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MLP_FILENAMES = ("sac+logos+ava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.safetensors")
_EXPECTED_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
_WHERE = ("Get the head from the LAION 'improved-aesthetic-predictor' repository "
          "(sac+logos+ava1-l14-linearMSE.pth) and CLIP from 'openai/clip-vit-large-patch14' (Hugging Face format).")


class AestheticMLP(nn.Module):
    """The 768-1024-128-64-16-1 head (no activations: the "linearMSE" variant). Dropout is inert in eval."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds: ``[B, input_dim]`` L2-normalised CLIP image embeddings -> ``[B]`` scores (about 1..10)."""
        return self.layers(embeds).squeeze(-1)


def load_mlp(path: str | Path) -> AestheticMLP:
    """Load the aesthetic head from a ``.pth`` (weights only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"Aesthetic head not found at '{path}'. {_WHERE}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle payloads that weights_only refuses, truncated files, ...
            raise ModelFormatError(f"Cannot read '{path}' as a weights-only torch checkpoint ({exc}). Use the "
                                   f"original sac+logos+ava1-l14-linearMSE.pth or a .safetensors copy.") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    missing = [k for k in _EXPECTED_KEYS if k not in state]
    if missing:
        raise ModelFormatError(f"'{path.name}' is not the linearMSE aesthetic head: missing keys {missing} "
                               f"(found {sorted(state)[:8]}...). The reluMSE variant and other heads are not "
                               f"supported. {_WHERE}")
    mlp = AestheticMLP(input_dim=int(state["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict({k: state[k] for k in _EXPECTED_KEYS})
    except RuntimeError as exc:
        raise ModelFormatError(f"'{path.name}' has the aesthetic-head keys but wrong shapes: {exc}") from exc
    return mlp.eval().requires_grad_(False)


def preprocess_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """images: ``[B, 3, H, W]`` float in [0, 1] -> ``[B, 3, size, size]`` CLIP-normalised (differentiable).

    Short side resized to ``size`` (bicubic, antialiased), then a centre crop."""
    _, _, h, w = images.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _find_clip_folder(folder: Path) -> Path | None:
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (cand / "config.json").is_file():
            return cand
    return None


class AestheticScorer:
    """CLIP vision tower + aesthetic head. ``score(images) -> np.ndarray [B]``."""

    def __init__(self, clip_model: nn.Module, mlp: AestheticMLP, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        proj = int(getattr(clip_model.config, "projection_dim", 0))
        if proj != mlp.input_dim:
            raise ModelFormatError(f"The CLIP model projects to {proj}-d embeddings but the aesthetic head expects "
                                   f"{mlp.input_dim}-d. The LAION head needs CLIP ViT-L/14 (projection_dim 768).")
        self.device, self.dtype = torch.device(device), dtype
        self.clip = clip_model.to(self.device, dtype).eval().requires_grad_(False)
        self.mlp = mlp.to(self.device, torch.float32).eval()
        self.image_size = int(clip_model.config.image_size)

    @classmethod
    def from_paths(cls, clip_dir: str | Path, mlp_path: str | Path, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> "AestheticScorer":
        """Load CLIP from a local Hugging Face folder (never downloads) and the head from a file."""
        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise ModelNotFoundError(f"No CLIP model folder at '{clip_dir}' (config.json missing). {_WHERE}")
        try:
            from transformers import CLIPVisionModelWithProjection
        except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
            raise DependencyError("transformers is needed for the aesthetic score: pip install transformers") from exc
        clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_dir), local_files_only=True)
        return cls(clip, load_mlp(mlp_path), device=device, dtype=dtype)

    @classmethod
    def from_dir(cls, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "AestheticScorer":
        """A folder holding the head file and a CLIP folder (itself, or a sub-folder with config.json)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"Aesthetic model folder '{folder}' does not exist. It must hold "
                                     f"{MLP_FILENAMES[0]} and a CLIP ViT-L/14 folder. {_WHERE}")
        heads = [folder / n for n in MLP_FILENAMES if (folder / n).is_file()]
        heads = heads or sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".safetensors")
                                and ("aesthetic" in p.name.lower() or "linearmse" in p.name.lower()))
        clip_dir = _find_clip_folder(folder)
        if not heads or clip_dir is None:
            raise ModelNotFoundError(f"'{folder}' must hold the aesthetic head ({' or '.join(MLP_FILENAMES)}) and a "
                                     f"CLIP ViT-L/14 folder with config.json; found head={bool(heads)}, "
                                     f"clip={clip_dir is not None}. {_WHERE}")
        return cls.from_paths(clip_dir, heads[0], device=device, dtype=dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: ``[B, 3, H, W]`` float in [0, 1] -> ``[B, D]`` L2-normalised CLIP image embeddings."""
        x = preprocess_for_clip(pixels.to(self.device, torch.float32), self.image_size).to(self.dtype)
        emb = self.clip(pixel_values=x).image_embeds.float()
        return F.normalize(emb, dim=-1)

    def score_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable: ``[B, 3, H, W]`` in [0, 1] -> ``[B]`` aesthetic scores."""
        return self.mlp(self.embed(pixels))

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray] | torch.Tensor) -> np.ndarray:
        """Score RGB images (numpy ``[H, W, 3]`` of any sizes, or a ``[B, 3, H, W]`` tensor in [0, 1])."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images).cpu().numpy()
        out = []
        for img in images:  # sizes differ: one image at a time
            arr = torch.tensor(to_rgb_uint8(img)).permute(2, 0, 1)[None].float() / 255.0
            out.append(self.score_tensor(arr))
        return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
