"""Standalone IdGlow generation: diffusers' ``QwenImageEditPlusPipeline`` + the IdGlow adapter.

k reference portraits -> faces -> identity tokens -> gated injection during sampling (``weight * Omega(t)``
per step; ``t`` = the step's flow time, 1 = noise). The portraits are also the edit pipeline's input
images ("Picture 1..k" of the prompt). Tasks (paper §4):

* ``group`` (Task 1, direct group fusion): ``anneal(tau=0.3)`` (Eq. 4). The paper gives no tau; 0.3 turns
  injection off for the final texture stretch t < 0.3, the boundary the paper itself uses in Task 2.
* ``age`` (Task 2, the same people as children): ``gate(0.3, 0.6)`` (Eq. 5).

Example::

    pipe = IdGlowPipeline.from_pretrained("Qwen/Qwen-Image-Edit-2511", "idglow.safetensors", device="cuda")
    result = pipe(["a.jpg", "b.jpg"], GenerateConfig(task="group", seed=0))
    result.images[0].save("out.png"); result.metadata["schedule"]

With true CFG (``true_cfg_scale > 1`` and a negative prompt) the identities are injected into both the
conditional and the negative pass, as the adapter was trained without ID dropout.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .adapter import KWARG, IdGlowAdapter
from .errors import IncompatibleAdapterError, InputError, ModelNotFoundError
from .id_encoder import check_finite
from .images import as_image_list, load_image, to_rgb_uint8
from .schedules import TASK_SCHEDULES, Schedule

__all__ = ["GenerateConfig", "IdGlowResult", "IdGlowPipeline", "load_edit_pipeline", "offline_processor"]

log = logging.getLogger("idglow")


def _finite(value) -> bool:
    """True for a finite real number (python, numpy or a one-element tensor)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@dataclass
class GenerateConfig:
    """Options of one generation. ``schedule=None`` uses the task's preset; ``prompt=None`` its template."""

    task: str = "group"
    prompt: str | None = None
    negative_prompt: str | None = " "
    weight: float = 1.0                          # global identity strength
    id_weights: Sequence[float] | None = None    # one per reference, multiplies that identity's values
    schedule: Schedule | str | None = None
    steps: int = 40
    true_cfg_scale: float = 4.0
    height: int | None = None                    # None: the pipeline's choice (from the last reference)
    width: int | None = None
    seed: int = 0
    face_indices: Sequence[int | None] | None = None  # which face per reference (default: the largest)
    output_type: str = "pil"                     # or "pt" ([B, 3, H, W] in [0, 1]) / "np", as diffusers
    candidates: int = 1                          # best-of-N: seeds seed .. seed + N - 1 (idglow_core.bestof)
    keep: int = 1                                # how many of them are finished and returned, best first
    prune_at: float | None = None                # flow time t_p: score at t_p, finish only `keep` (seedsearch)
    sequential: bool = False                     # one candidate per DiT call (as IdGlowSeedSearch): same images
    id_guidance: Any = None                      # a guidance.GuidanceConfig: identity guidance in Omega(t)

    def __post_init__(self) -> None:
        if self.task not in TASK_SCHEDULES:
            raise InputError(f"Unknown task '{self.task}'. Use one of {sorted(TASK_SCHEDULES)} ('group' = direct "
                             f"group fusion, 'age' = the same people as children).")
        if not (_finite(self.weight) and _finite(self.true_cfg_scale)) or self.steps < 1 or self.weight < 0 \
                or self.true_cfg_scale < 0:
            raise InputError(f"steps must be >= 1 and weight, true_cfg_scale finite numbers >= 0; got "
                             f"steps={self.steps}, weight={self.weight}, true_cfg_scale={self.true_cfg_scale}.")
        for name in ("id_weights", "face_indices"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")):
                raise InputError(f"{name} must be a list with one entry per reference, got {value!r}.")
        if self.id_weights is not None and not all(_finite(w) and float(w) >= 0 for w in self.id_weights):
            raise InputError(f"id_weights must be finite numbers >= 0, one per reference; got {list(self.id_weights)}.")
        from .seedsearch import check_search

        check_search(self.candidates, self.keep, self.prune_at)

    def resolved_schedule(self) -> Schedule:
        if self.schedule is None:
            return TASK_SCHEDULES[self.task]
        return self.schedule if isinstance(self.schedule, Schedule) else Schedule.parse(self.schedule)


@dataclass
class IdGlowResult:
    """images: PIL images (or what ``output_type`` asks for); metadata: task, prompt, schedule (dict),
    weights, seed, steps, faces used."""

    images: list
    metadata: dict[str, Any] = field(default_factory=dict)


def offline_processor(image_processor, tokenizer, chat_template: str | None = None):
    """A ``Qwen2VLProcessor`` built without torchvision (the unused video processor is left out).

    transformers type-checks ``video_processor=None`` against a torchvision-gated class
    (huggingface/transformers#43986); this subclass skips the check for ``None`` only.
    """
    from transformers import Qwen2VLProcessor

    class OfflineQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    return OfflineQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=chat_template or getattr(tokenizer, "chat_template", None))


def _processor_without_torchvision(folder: str, local_files_only: bool):
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    kw = dict(subfolder="processor", local_files_only=local_files_only)
    return offline_processor(Qwen2VLImageProcessorPil.from_pretrained(folder, **kw),
                             AutoTokenizer.from_pretrained(folder, **kw))


def load_edit_pipeline(model: str | os.PathLike, dtype: torch.dtype | None = None,
                       local_files_only: bool | None = None):
    """``QwenImageEditPlusPipeline.from_pretrained`` from a local folder or the Hugging Face cache.

    ``local_files_only`` defaults to True when ``HF_HUB_OFFLINE`` is set. Without torchvision the processor
    is rebuilt from its image processor and tokenizer. Missing files -> :class:`ModelNotFoundError`.
    """
    from diffusers import QwenImageEditPlusPipeline

    model = str(model)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    looks_local = os.path.isabs(model) or model.startswith(".") or os.path.exists(model) or model.count("/") != 1
    if looks_local and not (Path(model) / "model_index.json").is_file():
        raise ModelNotFoundError(f"No diffusers pipeline in '{model}' (model_index.json missing). Pass the folder "
                                 f"of Qwen-Image-Edit-2511 in diffusers layout, or a Hugging Face id such as "
                                 f"Qwen/Qwen-Image-Edit-2511.")
    kw: dict[str, Any] = dict(torch_dtype=dtype, local_files_only=local_files_only)
    try:
        try:
            pipe = QwenImageEditPlusPipeline.from_pretrained(model, **kw)
        except ImportError as exc:
            if "orchvision" not in str(exc):
                raise
            log.info("torchvision is not installed: building the Qwen2-VL processor without its video part")
            pipe = QwenImageEditPlusPipeline.from_pretrained(
                model, processor=_processor_without_torchvision(model, local_files_only), **kw)
    except (OSError, ValueError) as exc:
        where = "the local Hugging Face cache (offline mode)" if local_files_only else "the Hugging Face Hub"
        raise ModelNotFoundError(f"Could not load the edit pipeline '{model}' from {where}: {exc}. Download it "
                                 f"first (huggingface-cli download {model}) or pass its local folder.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_rgb(ref: Any) -> np.ndarray:
    if isinstance(ref, (str, os.PathLike)):
        return load_image(ref)
    return to_rgb_uint8(ref)


class IdGlowPipeline:
    """A Qwen-Image-Edit-Plus pipeline whose DiT gets IdGlow identity tokens at every step.

    ``analyzer`` is a face backend (``idglow_core.faces.load_analyzer``); it is needed when no precomputed
    embeddings are passed, and for best-of-N / seed search (scoring). ``adapter=None`` runs the base model
    (training-free identity: ``candidates``, ``prune_at``, ``id_guidance``). Identity guidance needs a
    differentiable ArcFace: ``arcface`` (default: ``w600k_r50.onnx`` of an insightface analyzer) and a
    keypoint ``detector`` (default: the analyzer's detections).
    """

    def __init__(self, pipe, adapter: IdGlowAdapter | None = None, analyzer=None, arcface=None, detector=None):
        p = next(pipe.transformer.parameters())
        if adapter is not None:
            adapter.check_fits(pipe.transformer)
            adapter = adapter.to(p.device, p.dtype).eval()
        self.pipe, self.adapter, self.analyzer = pipe, adapter, analyzer
        self.arcface, self.detector = arcface, detector

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, adapter: str | os.PathLike | None,
                        device: str | None = None,
                        dtype: torch.dtype | None = None, face_backend: str = "auto",
                        face_model_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None) -> "IdGlowPipeline":
        """Load the base pipeline (folder or HF cache), the adapter file (None: base model only) and a face
        analyzer."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        ad = None if adapter is None else IdGlowAdapter.load(adapter)  # file errors before the slow base load
        pipe = load_edit_pipeline(model, dtype, local_files_only).to(device)
        analyzer = None
        if face_backend != "none":
            from .faces import load_analyzer
            analyzer = load_analyzer(face_backend, model_dir=face_model_dir)
        return cls(pipe, ad, analyzer)

    def identities(self, images: Sequence[np.ndarray], embeddings: torch.Tensor | np.ndarray | None = None,
                   face_indices: Sequence[int | None] | None = None) -> tuple[torch.Tensor, list[dict]]:
        """Face embeddings ``[k, id_dim]`` for the references, and a record of the faces used."""
        want = self.adapter.config.id_dim
        if embeddings is not None:
            if isinstance(embeddings, torch.Tensor):  # e.g. a torch face encoder's output: bf16, on GPU, with grad
                emb = embeddings.detach().to(device="cpu", dtype=torch.float32)
            else:
                emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
            if emb.ndim != 2 or emb.shape[0] != len(images):
                raise InputError(f"Precomputed embeddings must be [k, d] with k = {len(images)} references, got "
                                 f"{tuple(emb.shape)}.")
            check_finite(emb, "Precomputed embeddings", "Recompute them; rows are references in order.")
            return emb, [{"source": "precomputed"} for _ in range(len(images))]
        if self.analyzer is None:
            raise InputError("No face analyzer was given and no embeddings were passed. Pass embeddings "
                             "[k, 512] or build the pipeline with an analyzer (idglow_core.faces.load_analyzer).")
        if self.analyzer.embedding_dim != want:
            raise IncompatibleAdapterError(
                f"The '{self.analyzer.name}' face backend gives {self.analyzer.embedding_dim}-d embeddings but this "
                f"adapter was trained on {want}-d ones. Use the insightface backend (ArcFace, 512-d)"
                f"{'' if want == 512 else ' or the backend the adapter was trained with'}.")
        from .faces import reference_faces

        faces = reference_faces(self.analyzer, images, face_indices)
        used = [{"source": self.analyzer.name, "bbox": [round(float(v), 1) for v in f.bbox],
                 "score": round(float(f.score), 4)} for f in faces]
        return torch.from_numpy(np.stack([f.embedding for f in faces]).astype(np.float32)), used

    @torch.no_grad()
    def __call__(self, references: Sequence[Any], config: GenerateConfig | None = None,
                 embeddings: torch.Tensor | np.ndarray | None = None) -> IdGlowResult:
        """references: k images (paths, PIL, ``[H, W, 3]`` arrays). embeddings: optional ``[k, id_dim]``."""
        from PIL import Image

        cfg = config or GenerateConfig()
        refs = [_as_rgb(r) for r in as_image_list(references, "references")]
        if not refs:
            raise InputError("No reference images given. Pass one portrait per person.")
        k = len(refs)
        schedule = cfg.resolved_schedule()
        prompt = cfg.prompt if cfg.prompt is not None else self._static_prompt(cfg.task, k)
        meta: dict[str, Any] = {"task": cfg.task, "prompt": prompt, "negative_prompt": cfg.negative_prompt,
                                "seed": cfg.seed, "steps": cfg.steps, "true_cfg_scale": cfg.true_cfg_scale}
        kwargs: dict[str, Any] = dict(image=[Image.fromarray(r) for r in refs], prompt=prompt,
                                      negative_prompt=cfg.negative_prompt, true_cfg_scale=cfg.true_cfg_scale,
                                      num_inference_steps=cfg.steps, height=cfg.height, width=cfg.width)
        attach = contextlib.nullcontext()
        if self.adapter is not None:
            max_ids = self.adapter.config.max_ids
            if k > max_ids:
                raise InputError(f"{k} references given but this adapter supports at most {max_ids} identities.")
            if cfg.id_weights is not None and len(cfg.id_weights) != k:
                raise InputError(f"{len(cfg.id_weights)} id_weights for {k} references; give one weight per "
                                 f"reference.")
            emb, faces = self.identities(refs, embeddings, cfg.face_indices)
            self.adapter.check_deployed_schedule(schedule, cfg.task)  # warns when training injected otherwise
            p = next(self.adapter.parameters())
            cond = self.adapter.condition(emb[None].to(p.device, p.dtype), weight=cfg.weight, schedule=schedule,
                                          id_weights=cfg.id_weights)
            kwargs["attention_kwargs"] = {KWARG: cond}
            attach = self.adapter.attach(self.pipe.transformer)
            meta.update({"schedule": schedule.to_dict(), "weight": cfg.weight,
                         "id_weights": None if cfg.id_weights is None else [float(w) for w in cfg.id_weights],
                         "faces": faces, "adapter": {"id_dim": self.adapter.config.id_dim, "max_ids": max_ids}})
        with attach:
            if cfg.candidates == 1 and cfg.id_guidance is None:
                generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
                out = self.pipe(**kwargs, generator=generator, output_type=cfg.output_type)
                images = list(out.images) if cfg.output_type == "pil" else out.images
            else:
                from .training_free import run_training_free

                pixels, extra = run_training_free(self, refs, cfg, kwargs)
                images, meta = _convert_output(pixels, cfg.output_type), {**meta, **extra}
        return IdGlowResult(images, meta)

    @staticmethod
    def _static_prompt(task: str, k: int) -> str:
        from .prompting import static_prompt

        return static_prompt(task, k)


def _convert_output(pixels: torch.Tensor, output_type: str):
    """``[B, 3, H, W]`` in [0, 1] -> what ``output_type`` asks for (as diffusers' postprocess)."""
    if output_type == "pt":
        return pixels
    arr = pixels.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8)) for a in arr]
