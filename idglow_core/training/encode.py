"""Turning validated samples into the tensors a step needs, with an optional on-disk cache.

Per sample (all on the CPU, no batch dim)::

    latents         [C, 1, h, w]      target, VAE-encoded (mode) and normalised
    ref_latents     k x [C, 1, h_j, w_j]   references at the VAE size the pipeline uses
    prompt_embeds   [L, D]            Qwen2.5-VL embeddings of the prompt with the reference images
    prompt_mask     [L]               1 = real token
    id_embeds       [k, id_dim]       face-analyzer embeddings of the references (the adapter's input)
    ref_face_embeds [k, D_arc]        torch-ArcFace embeddings of the references (the ID loss's targets)

Encodings live on disk, never all in memory: each sample's latents and prompt embeddings are written once as
``<cache_dir>/<hash>.safetensors`` (floating tensors in bf16; the hash covers the files' contents, the prompt,
the sizes and the model; ``data.cache_dir``, default ``<output_dir>/cache``) and read back when a step needs
the sample (:class:`LazyEncodings`). Under accelerate the ranks split the encoding (rank r encodes samples r,
r + world, ...; cached samples are skipped), wait for each other, and then every rank reads any sample from
the shared folder. :func:`free_text_encoder` drops the text encoder before training. ``id_embeds`` and
``ref_face_embeds`` are never cached on disk: they depend on this run's face backend and ID-loss encoder (a
cache shared by a dlib and an insightface run, or by a run without and one with the ID loss, must not hand one
the other's embeddings); they are small and computed once per sample and process.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..images import load_image
from .data import Sample, fit_area
from .identity import IdentityLoss
from .safety import cache_entry_ok

__all__ = ["SampleEncoder", "LazyEncodings", "collate", "pipeline_areas", "encode_samples", "encode_sharded",
           "free_text_encoder", "shard_needs_encoding", "write_cache_file", "read_cache_file", "as_stored", "CACHE_DTYPE"]

log = logging.getLogger("idglow")
CACHE_KEYS = ("latents", "prompt_embeds", "prompt_mask")  # what every sample's cache file must hold
CACHE_DTYPE = torch.bfloat16  # floating tensors on disk (the DiT computes in bf16 at real scale anyway)


def write_cache_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (floating ones as bf16) to ``path`` atomically (temp file + rename): a rank that
    reads a cache file never sees a half-written one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({k: (v.to(CACHE_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(tmp))
    tmp.replace(path)


def read_cache_file(path: Path) -> dict[str, torch.Tensor]:
    """A cache file's tensors, floating ones as float32."""
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


def as_stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a round trip through a cache file gives (bf16-rounded floats), without the file."""
    return {k: v.to(CACHE_DTYPE).float() if v.is_floating_point() else v for k, v in tensors.items()}


def pipeline_areas() -> tuple[int, int]:
    """(condition-image area for the VLM, reference area for the VAE) that QwenImageEditPlusPipeline uses:
    384 x 384 and 1024 x 1024 pixels."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    return mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE


class SampleEncoder:
    """Encodes :class:`Sample` objects with a pipeline's VAE and text encoder (no grad), memoised."""

    def __init__(self, pipe, identity: IdentityLoss | None, resolution: int, cache_dir: str | Path = "",
                 model_tag: str = "", areas: tuple[int, int] | None = None):
        self.pipe, self.identity, self.resolution = pipe, identity, resolution
        self.areas = areas or pipeline_areas()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_tag = model_tag
        self._ids: dict[int, dict[str, torch.Tensor]] = {}  # identity tensors per sample index (small)
        self._paths: dict[tuple, Path] = {}  # cache file per (target, refs, prompt)
        self.encoded = 0  # samples this process ran through the VAE and the text encoder

    def _key(self, s: Sample) -> str:
        h = hashlib.sha256()
        for p in [s.target, *s.refs]:
            h.update(Path(p).read_bytes())
        cond, vae = self.areas
        h.update(json.dumps([s.prompt, self.resolution, cond, vae, self.model_tag]).encode())
        return h.hexdigest()[:32]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        h, w = image.shape[:2]
        x = self.pipe.image_processor.preprocess(Image.fromarray(image), h, w)  # [1, 3, H, W] in [-1, 1]
        x = x.to(device=vae.device, dtype=vae.dtype)[:, :, None]
        lat = vae.encode(x).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
        return ((lat - mean) / std)[0].float().cpu()

    @torch.no_grad()
    def _encode(self, s: Sample) -> dict[str, torch.Tensor]:
        cond_area, vae_area = self.areas
        target = fit_area(load_image(s.target), self.resolution * self.resolution)
        refs = [load_image(r) for r in s.refs]
        cond = [Image.fromarray(fit_area(r, cond_area)) for r in refs]
        device = self.pipe.text_encoder.device
        pe, pm = self.pipe.encode_prompt(prompt=[s.prompt], image=cond, device=device)
        pm = torch.ones(pe.shape[:2], dtype=torch.long) if pm is None else pm
        out = {"latents": self.encode_image(target), "prompt_embeds": pe[0].float().cpu(),
               "prompt_mask": pm[0].long().cpu()}
        for j, r in enumerate(refs):
            out[f"ref_latents.{j}"] = self.encode_image(fit_area(r, vae_area))
        return out

    @torch.no_grad()
    def _identities(self, s: Sample) -> dict[str, torch.Tensor]:
        """The run-specific part: this run's face-analyzer embeddings and, with the ID loss, the references
        embedded by its ArcFace (both depend on the face models, which the cache key does not cover)."""
        out = {"id_embeds": torch.from_numpy(np.stack([f.embedding for f in s.ref_faces])).float()}
        if self.identity is not None:
            embs = [self.identity.reference_embeddings(load_image(r), [f.kps]) for r, f in zip(s.refs, s.ref_faces)]
            out["ref_face_embeds"] = torch.cat(embs).float().cpu()
        return out

    def cache_path(self, s: Sample) -> Path | None:
        """``<cache_dir>/<hash>.safetensors`` of ``s`` (the hash reads its images once per process)."""
        if self.cache_dir is None:
            return None
        ident = (str(s.target), tuple(map(str, s.refs)), s.prompt)
        if ident not in self._paths:
            self._paths[ident] = self.cache_dir / f"{self._key(s)}.safetensors"
        return self._paths[ident]

    def is_cached(self, s: Sample) -> bool:
        path = self.cache_path(s)
        return path is not None and path.is_file()

    def ensure(self, s: Sample) -> Path | None:
        """Encode ``s`` into its cache file unless the file exists; returns the file (None without a cache)."""
        path = self.cache_path(s)
        if path is not None and not cache_entry_ok(path, CACHE_KEYS):  # missing, or damaged: encoded again
            write_cache_file(path, self._encode(s))
            self.encoded += 1
        return path

    def load(self, index: int, s: Sample) -> dict[str, torch.Tensor]:
        """Sample ``index``'s encoding: its cache file read from disk (or, without a cache, encoded now), plus
        this run's identity tensors (computed once per index and kept: a few KB)."""
        path = self.cache_path(s)
        if path is not None and path.is_file():
            enc = read_cache_file(path)
        else:
            enc = as_stored(self._encode(s))
            self.encoded += 1
        enc = {k: v for k, v in enc.items() if k not in ("id_embeds", "ref_face_embeds")}  # files of older versions
        if index not in self._ids:
            self._ids[index] = self._identities(s)
        enc.update(self._ids[index])
        return enc

    def __call__(self, index: int, sample: Sample) -> dict[str, torch.Tensor]:
        """Encode (or find in the cache) and load sample ``index``."""
        self.ensure(sample)
        return self.load(index, sample)


def _libc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): hand freed heap pages back to the OS."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
        return lambda: trim(0) and None
    except (OSError, AttributeError):
        return lambda: None


_release_freed_memory = _libc_trim()


class LazyEncodings(Sequence):
    """The encoded samples of a run, read from disk on access: ``enc[i]`` = ``load(i, items[i])`` (a fresh
    dict each time; the loop holds only the current batch). Slices give lists.

    Each access first returns the heap pages that earlier samples freed to the OS (glibc ``malloc_trim``):
    the ~10 MB tensors of a sample come from glibc's heap once its dynamic mmap threshold has risen, and the
    freed heap is not given back by itself, so without this peak RSS crept up with every new sample (bench:
    +20 % from 8 to 64 real-size samples, although no encoding was kept).
    """

    def __init__(self, items: Sequence[Any], load: Callable[[int, Any], dict[str, torch.Tensor]]):
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        _release_freed_memory()
        if isinstance(i, slice):
            return [self.load(j, self.items[j]) for j in range(*i.indices(len(self.items)))]
        if i < 0:
            i += len(self.items)
        return self.load(i, self.items[i])


def encode_sharded(items: Sequence[Any], ensure: Callable[[Any], Any], accelerator=None,
                   is_cached: Callable[[Any], bool] | None = None) -> None:
    """Run ``ensure(item)`` (encode into the cache unless there) for this rank's share of ``items``: rank r of
    w takes items r, r + w, ... Then all ranks wait for each other; if any rank failed, every rank raises
    (the failing one its own error), so no rank waits forever for a crashed one. With ``is_cached``, every
    rank then checks that it sees every item's files (the cache folder must be shared by all processes)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    error: BaseException | None = None
    try:
        for i in range(rank, len(items), world):
            ensure(items[i])
            _release_freed_memory()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    failed = error is not None
    if accelerator is not None and world > 1:
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if error is not None:
        raise error
    if failed:
        raise ConfigError("Encoding the training data failed on another process; its log has the error.")
    missing = [i for i, item in enumerate(items) if is_cached is not None and not is_cached(item)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(items)} encoded samples (e.g. index {missing[0]}) are not in the "
                          f"cache folder on process {rank}: the other processes wrote them somewhere this one "
                          f"cannot see. Point data.cache_dir at a folder every node shares.")


def shard_needs_encoding(items: Sequence[Any], is_cached: Callable[[Any], bool], accelerator=None) -> bool:
    """Whether this rank's share of ``items`` (see :func:`encode_sharded`) has anything not yet in the cache:
    when not, the trainer need not load the text encoder at all."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    return not all(is_cached(items[i]) for i in range(rank, len(items), world))


def free_text_encoder(pipe) -> None:
    """Drop the pipeline's text encoder (prompts are encoded; 15 GiB for Qwen2.5-VL-7B in bf16) and give the
    memory back before training."""
    if getattr(pipe, "text_encoder", None) is None:
        return
    pipe.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack encoded samples into a batch. Prompts are right-padded (mask 0); targets, references and their
    count must agree across the batch (use data.batch_size 1, or bucket the manifest by size)."""
    keys = sorted((k for k in items[0] if k.startswith("ref_latents.")), key=lambda k: int(k.split(".")[1]))
    shapes = {(tuple(it["latents"].shape), tuple(tuple(it[k].shape) for k in keys),
               tuple(sorted(k for k in it if k.startswith("ref_latents.")))) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"Samples in one batch differ in size or number of references ({len(shapes)} kinds). "
                          f"Use data.batch_size=1 with gradient accumulation, or bucket the manifest by size.")
    length = max(it["prompt_embeds"].shape[0] for it in items)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0) * (x.ndim - 1) + (0, length - x.shape[0]))

    batch = {"latents": torch.stack([it["latents"] for it in items]),
             "ref_latents": [torch.stack([it[k] for it in items]) for k in keys],
             "prompt_embeds": torch.stack([pad(it["prompt_embeds"]) for it in items]),
             "prompt_mask": torch.stack([pad(it["prompt_mask"]) for it in items]),
             "id_embeds": torch.stack([it["id_embeds"] for it in items]),
             "id_mask": torch.ones(len(items), items[0]["id_embeds"].shape[0], dtype=torch.bool)}
    if "ref_face_embeds" in items[0]:
        batch["ref_face_embeds"] = [it["ref_face_embeds"] for it in items]
    return batch


def run_cache_dir(cfg) -> Path:
    """``data.cache_dir``, or ``<run.output_dir>/cache`` when it is empty."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.output_dir) / "cache"


def sample_encoder(cfg, pipe, identity: IdentityLoss | None) -> SampleEncoder:
    """The run's :class:`SampleEncoder` (``cfg``: a TrainConfig): its sizes, cache folder and model tag."""
    default_cond, default_ref = pipeline_areas()
    areas = (cfg.data.condition_area or default_cond, cfg.data.ref_area or default_ref)
    return SampleEncoder(pipe, identity, cfg.data.resolution, run_cache_dir(cfg),
                         model_tag=cfg.model.pretrained or f"tiny-{cfg.run.seed}", areas=areas)


def encode_samples(cfg, pipe, samples: Sequence[Sample], identity: IdentityLoss | None,
                   accelerator=None) -> LazyEncodings:
    """Encode a run's samples into the disk cache, split across ranks, and return them as lazily loaded
    encodings (``cfg``: a TrainConfig)."""
    encoder = sample_encoder(cfg, pipe, identity)
    encode_sharded(samples, encoder.ensure, accelerator, encoder.is_cached)
    log.info("encodings in %s: %d samples, %d encoded by this process", encoder.cache_dir, len(samples),
             encoder.encoded)
    return LazyEncodings(samples, encoder.load)
