"""DPO training data: the pair manifest, its validation, encoding, batching, and a synthetic pair set.

One line per preference pair, paths relative to the manifest's folder (what
``idglow_core.preference.review.apply_decisions`` writes; extra keys are ignored)::

    {"chosen": "real.jpg", "rejected": "gen_3.png", "refs": ["a.jpg", "b.jpg"], "prompt": "...", "task": "group"}

:func:`read_pair_manifest` checks every line before training starts: malformed JSON, missing keys, missing
or unreadable images, references without a detectable face, chosen and rejected that would encode to
different latent sizes (the pair shares one noise tensor), all listed with line numbers in one
:class:`~idglow_core.errors.ManifestError`.

Encoded pair (CPU, no batch dim): every key of an SFT sample for the *chosen* image (``latents``,
``ref_latents.j``, ``prompt_embeds``, ``prompt_mask``, ``id_embeds``; see ``encode.py``) plus
``latents_rejected [C, 1, h, w]``. So SFT's ``collate`` and the FaceSim validator read pairs unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import ConfigError, ImageReadError, ManifestError
from ..faces.base import Face, FaceAnalyzer
from ..images import load_image
from ..jsonl import resolve_path
from .data import Sample, check_common_fields, check_references, fit_area, read_validated
from .safety import cache_entry_ok

__all__ = ["PairSample", "read_pair_manifest", "write_synthetic_pairs", "PairEncoder", "collate_pairs",
           "encode_pairs"]

log = logging.getLogger("idglow")


@dataclass
class PairSample:
    """One validated manifest line. ``ref_faces[j]`` is the chosen (largest) face of ``refs[j]``."""

    line: int
    chosen: Path
    rejected: Path
    refs: list[Path]
    prompt: str
    task: str
    ref_faces: list[Face] = field(default_factory=list)

    def as_sample(self) -> Sample:
        """The chosen side as an SFT :class:`Sample` (what the shared encoder reads)."""
        return Sample(line=self.line, target=self.chosen, refs=self.refs, prompt=self.prompt, task=self.task,
                      ref_faces=self.ref_faces)


def _parse_line(item: dict, lineno: int, root: Path, problems: list[str]) -> PairSample | None:
    refs, prompt, task = item.get("refs"), item.get("prompt", ""), item.get("task", "group")
    bad = check_common_fields(item, ("chosen", "rejected"))
    if not bad and item["chosen"] == item["rejected"]:
        bad.append("'chosen' and 'rejected' are the same file")
    if bad:
        problems.append(f"line {lineno}: " + "; ".join(bad))
        return None
    return PairSample(line=lineno, chosen=resolve_path(root, item["chosen"]),
                      rejected=resolve_path(root, item["rejected"]), refs=[resolve_path(root, r) for r in refs],
                      prompt=prompt, task=task)


def _check_pair(pair: PairSample, analyzer: FaceAnalyzer | None, resolution: int | None,
                problems: list[str]) -> None:
    sizes = {}
    for side in ("chosen", "rejected"):
        try:
            image = load_image(getattr(pair, side))
        except ImageReadError as exc:
            problems.append(f"line {pair.line}: {side} {exc}")
            continue
        if resolution:
            sizes[side] = fit_area(image, resolution * resolution).shape[:2]
    if len(sizes) == 2 and sizes["chosen"] != sizes["rejected"]:
        (hc, wc), (hr, wr) = sizes["chosen"], sizes["rejected"]
        problems.append(f"line {pair.line}: chosen and rejected have different aspect ratios ({wc}x{hc} vs "
                        f"{wr}x{hr} px at data.resolution={resolution}); a pair shares one noise tensor, so crop "
                        f"the rejected image to the chosen one's aspect ratio")
    pair.ref_faces.extend(check_references(pair.line, pair.refs, analyzer, problems))


def read_pair_manifest(path: str | Path, analyzer: FaceAnalyzer | None = None, *, max_ids: int | None = None,
                       resolution: int | None = None) -> list[PairSample]:
    """Parse and validate a DPO manifest; return one :class:`PairSample` per line (blank lines skipped).

    With ``analyzer`` every reference must hold a face; ``max_ids`` caps references per pair; with
    ``resolution`` chosen and rejected must fit to the same size. Raises :class:`ManifestError` listing every
    problem with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"DPO manifest not found: '{path}'. Set data.manifest to a JSONL file with one "
                            f"{{\"chosen\", \"rejected\", \"refs\", \"prompt\", \"task\"}} object per line "
                            f"(train/make_pairs.py writes one).")
    pairs = read_validated(path, _parse_line, lambda p, problems: _check_pair(p, analyzer, resolution, problems),
                           what="DPO manifest", noun="pairs", max_ids=max_ids)
    log.info("DPO manifest %s: %d pairs validated", path, len(pairs))
    return pairs


def write_synthetic_pairs(folder: str | Path, n: int, photos: Sequence[str | Path], *, task: str = "group",
                          size: int = 128) -> Path:
    """Write ``n`` synthetic preference pairs for smoke runs and return the manifest path.

    The chosen image of pair i is the synthetic SFT group photo (two portraits side by side, see
    ``data.write_synthetic_manifest``); the rejected one is the same photo degraded as in §3.4 (noise
    injection for even i, saturation for odd i). Deterministic.
    """
    from ..preference.perturb import Perturbation
    from .data import write_synthetic_manifest

    folder = Path(folder)
    sft = write_synthetic_manifest(folder, n, photos, task=task, size=size)
    lines = []
    for i, raw in enumerate(sft.read_text(encoding="utf-8").splitlines()):
        item = json.loads(raw)
        damage = Perturbation("noise", 0.15, seed=i) if i % 2 == 0 else Perturbation("saturation", 0.2, seed=i)
        rejected = f"rejected_{i}.png"
        Image.fromarray(damage.apply(load_image(folder / item["target"]))).save(folder / rejected)
        lines.append(json.dumps({"chosen": item["target"], "rejected": rejected, "refs": item["refs"],
                                 "prompt": item["prompt"], "task": task, "rejected_params": damage.to_dict()}))
    sft.unlink()  # the SFT manifest is not a DPO manifest: keep one manifest in the folder
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


class PairEncoder:
    """Encodes pairs: the chosen side (with refs and prompt) through the shared SFT ``SampleEncoder``, the
    rejected image through the same VAE path, each in its own cache file (see ``encode.py``)."""

    def __init__(self, sample_encoder, resolution: int):
        self.samples, self.resolution = sample_encoder, resolution
        self._paths: dict[str, Path] = {}

    def _rejected_path(self, path: Path) -> Path | None:
        cache = self.samples.cache_dir
        if cache is None:
            return None
        if str(path) not in self._paths:  # hash the file once per process
            key = hashlib.sha256(path.read_bytes() + json.dumps([self.resolution, self.samples.model_tag]).encode())
            self._paths[str(path)] = cache / f"rejected-{key.hexdigest()[:32]}.safetensors"
        return self._paths[str(path)]

    def _encode_rejected(self, path: Path) -> dict[str, torch.Tensor]:
        return {"latents": self.samples.encode_image(fit_area(load_image(path), self.resolution * self.resolution))}

    def ensure(self, pair: PairSample) -> None:
        """Encode the pair into the cache unless both files are there."""
        from .encode import write_cache_file

        self.samples.ensure(pair.as_sample())
        file = self._rejected_path(pair.rejected)
        if file is not None and not cache_entry_ok(file, ("latents",)):  # missing, or damaged: encoded again
            write_cache_file(file, self._encode_rejected(pair.rejected))

    def is_cached(self, pair: PairSample) -> bool:
        file = self._rejected_path(pair.rejected)
        return self.samples.is_cached(pair.as_sample()) and file is not None and file.is_file()

    def load(self, index: int, pair: PairSample) -> dict[str, torch.Tensor]:
        """Pair ``index`` read from the cache (encoded now without one)."""
        from .encode import as_stored, read_cache_file

        out = self.samples.load(index, pair.as_sample())
        file = self._rejected_path(pair.rejected)
        rejected = read_cache_file(file) if file is not None and file.is_file() else \
            as_stored(self._encode_rejected(pair.rejected))
        out["latents_rejected"] = rejected["latents"]
        if out["latents_rejected"].shape != out["latents"].shape:
            raise ManifestError(f"line {pair.line}: chosen latents {tuple(out['latents'].shape)} and rejected "
                                f"latents {tuple(out['latents_rejected'].shape)} differ; give both images the "
                                f"same aspect ratio.")
        return out

    def __call__(self, index: int, pair: PairSample) -> dict[str, torch.Tensor]:
        self.ensure(pair)
        return self.load(index, pair)


def encode_pairs(cfg, pipe, pairs: Sequence[PairSample], accelerator=None):
    """Encode a run's pairs into the disk cache, split across ranks (``cfg``: a TrainConfig); returns them as
    lazily loaded :class:`~idglow_core.training.encode.LazyEncodings`. Sizes and cache as for SFT."""
    from .encode import LazyEncodings, encode_sharded, sample_encoder

    pair_encoder = PairEncoder(sample_encoder(cfg, pipe, None), cfg.data.resolution)
    encode_sharded(pairs, pair_encoder.ensure, accelerator, pair_encoder.is_cached)
    return LazyEncodings(pairs, pair_encoder.load)


def collate_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """SFT ``collate`` of the chosen side plus ``latents_rejected [B, C, 1, h, w]``."""
    from .encode import collate

    if any("latents_rejected" not in it for it in items):
        raise ConfigError("collate_pairs got an item without 'latents_rejected': encode DPO data with "
                          "encode_pairs, not the SFT encoder.")
    batch = collate(items)
    batch["latents_rejected"] = torch.stack([it["latents_rejected"] for it in items])
    return batch
