"""The consistency metrics of paper §3.4, each computed for one image against its references and prompt.

- ``phi_id``: FaceSim strict (Eq. 2-3 form): Hungarian-matched cosine between the reference faces and the faces
  found in the image, averaged over the k references, a missing face counting 0.
- ``phi_aes``: LAION aesthetic score (:class:`idglow_core.aesthetic.AestheticScorer`); off without a scorer.
- ``phi_sem``: CLIP cosine between the whole image (letterboxed, nothing cropped away) and the prompt.
- ``phi_obj``: object/attribute consistency (clothing, accessories): for each reference j matched to a face in
  the image, the CLIP image cosine between the person region around that face and the person region of the
  reference portrait, with both face boxes filled grey so that only the surroundings count; averaged over
  the k references, unmatched = 0. ``phi_sem`` and ``phi_obj`` are off without a CLIP model.

A metric that is off is ``None`` and takes no part in Eq. 8-9.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..aesthetic import CLIP_MEAN, CLIP_STD
from ..errors import DependencyError, ModelNotFoundError
from ..faces.base import Face, FaceAnalyzer
from ..faces.loader import reference_faces
from ..facesim import match_identities
from ..images import to_rgb_uint8

__all__ = ["ClipEncoder", "References", "MetricSuite", "person_region"]

log = logging.getLogger("idglow")
MASK_VALUE = 128  # grey used to blank face boxes and to letterbox


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output (projected ``pooler_output``); older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEncoder:
    """A transformers ``CLIPModel`` + tokenizer: L2-normalised image ``[B, D]`` and text ``[B, D]`` embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.name = str(getattr(model.config, "_name_or_path", "") or "clip")

    @classmethod
    def from_dir(cls, folder: str | Path, device: str = "cpu") -> "ClipEncoder":
        """Load a CLIP folder in Hugging Face format (config.json, weights, tokenizer files); never downloads."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"No CLIP model at '{folder}' (config.json missing). Point --clip-dir at a "
                                     f"local copy of e.g. openai/clip-vit-large-patch14 in Hugging Face format.")
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
            raise DependencyError("transformers is needed for phi_sem/phi_obj: pip install transformers") from exc
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        enc = cls(model, tok, device=device)
        enc.name = folder.name
        return enc

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` uint8 -> ``[1, 3, S, S]``: padded to a square with grey, resized, CLIP-normalised."""
        x = to_rgb_uint8(image)
        h, w = x.shape[:2]
        side = max(h, w)
        canvas = np.full((side, side, 3), MASK_VALUE, np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = x
        t = torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / 255.0
        t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0.0, 1.0)
        return (t - t.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / t.new_tensor(CLIP_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """k images (any sizes) -> ``[k, D]`` unit-norm CLIP image embeddings."""
        if not images:
            return torch.zeros(0, int(self.model.config.projection_dim))
        px = torch.cat([self.pixels(im) for im in images]).to(self.device)
        return F.normalize(_features(self.model.get_image_features(pixel_values=px)).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """k prompts -> ``[k, D]`` unit-norm CLIP text embeddings (truncated to the model's context)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return F.normalize(_features(out).float(), dim=-1).cpu()


def person_region(image: np.ndarray, bbox: Sequence[float], context: float) -> np.ndarray:
    """The region around one face (``context`` face widths either side, half a face above, ``2 * context``
    face heights below the chin), with the face box itself filled grey. Returns ``[h, w, 3]`` uint8."""
    H, W = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    fw, fh, cx = max(x2 - x1, 1.0), max(y2 - y1, 1.0), (x1 + x2) / 2.0
    rx1, rx2 = int(max(0, np.floor(cx - context * fw))), int(min(W, np.ceil(cx + context * fw)))
    ry1, ry2 = int(max(0, np.floor(y1 - 0.5 * fh))), int(min(H, np.ceil(y2 + 2.0 * context * fh)))
    region = image[ry1:ry2, rx1:rx2].copy()
    fx1, fy1 = int(max(0, np.floor(x1)) - rx1), int(max(0, np.floor(y1)) - ry1)
    fx2, fy2 = int(min(W, np.ceil(x2)) - rx1), int(min(H, np.ceil(y2)) - ry1)
    region[max(fy1, 0):max(fy2, 0), max(fx1, 0):max(fx2, 0)] = MASK_VALUE
    return region


@dataclass
class References:
    """The k reference portraits of one group, analysed once. embeddings ``[k, d]``; obj ``[k, D]`` or None."""

    faces: list[Face]
    embeddings: np.ndarray
    obj: torch.Tensor | None


class MetricSuite:
    """Computes ``{"id", "aes", "sem", "obj"}`` (plus ``n_faces``) for one image against its references."""

    def __init__(self, analyzer: FaceAnalyzer, aesthetic=None, clip: ClipEncoder | None = None,
                 obj_context: float = 1.5):
        self.analyzer, self.aesthetic, self.clip, self.obj_context = analyzer, aesthetic, clip, obj_context

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics that are on."""
        return ("id",) + (("aes",) if self.aesthetic is not None else ()) + (("sem", "obj") if self.clip else ())

    score_keys = ("id", "aes", "sem", "obj", "n_faces")  # the keys of :meth:`score`, in order

    @property
    def signature(self) -> str:
        """What the scores depend on besides the image: part of the cache key, so other models re-score."""
        desc = {"face": self.analyzer.name, "dim": self.analyzer.embedding_dim, "metrics": self.metrics,
                "clip": self.clip.name if self.clip else None, "obj_context": self.obj_context}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def references(self, images: Sequence[np.ndarray]) -> References:
        """Analyse the k reference portraits (largest face each; NoFaceError names the faceless one)."""
        images = [to_rgb_uint8(im) for im in images]
        faces = reference_faces(self.analyzer, images)
        obj = None
        if self.clip is not None:
            obj = self.clip.embed_images([person_region(im, f.bbox, self.obj_context) for im, f in zip(images, faces)])
        return References(faces=faces, embeddings=np.stack([f.embedding for f in faces]), obj=obj)

    def score(self, image: np.ndarray, refs: References, prompt: str) -> dict:
        """phi values of one image. Returns ``{"id": float, "aes": float|None, "sem": float|None,
        "obj": float|None, "n_faces": int}``."""
        image = to_rgb_uint8(image)
        faces = self.analyzer.analyze(image)
        gen = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, refs.embeddings.shape[1]))
        match = match_identities(refs.embeddings, gen)
        out = {"id": match.strict, "aes": None, "sem": None, "obj": None, "n_faces": len(faces)}
        if self.aesthetic is not None:
            out["aes"] = float(self.aesthetic.score([image])[0])
        if self.clip is not None:
            img_emb = self.clip.embed_images([image])[0]
            out["sem"] = float(img_emb @ self.clip.embed_texts([prompt])[0])
            out["obj"] = self._phi_obj(image, faces, match.assignment, refs)
        return out

    def _phi_obj(self, image: np.ndarray, faces: list[Face], assignment: np.ndarray, refs: References) -> float:
        hit = [j for j, a in enumerate(assignment) if a >= 0]
        if not hit:
            return 0.0
        regions = [person_region(image, faces[assignment[j]].bbox, self.obj_context) for j in hit]
        emb = self.clip.embed_images(regions)  # [len(hit), D]
        sims = (emb * refs.obj[hit]).sum(-1)
        return float(sims.sum() / len(assignment))  # strict: unmatched references count 0
