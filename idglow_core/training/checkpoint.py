"""Resumable checkpoints, written atomically, and the output-folder rules.

Layout of an output folder::

    <output_dir>/config.yaml                        the resolved config of the run
    <output_dir>/checkpoints/step-00000004/         one folder per checkpoint:
        trainable.safetensors                       every trainable tensor (adapter, LoRA or full DiT)
        ema.safetensors                             EMA shadow weights (when optim.ema_decay > 0)
        optimizer.pt                                optimizer state (read with torch.load(weights_only=True))
        state.json                                  step, seed, config, format version
    <output_dir>/final/                             the exported weights (see export.py)
    <output_dir>/logs/                              metrics.jsonl and TensorBoard events

A checkpoint is first written to ``checkpoints/.tmp-step-...`` and then renamed, so a process killed while
saving leaves the previous checkpoint untouched and never a half-written ``step-*`` folder. Every random draw
of the trainer is derived from ``(seed, step, rank)``, so ``step`` restores the RNG exactly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, ModelFormatError

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "prepare_output_dir",
           "list_checkpoints", "RUN_ITEMS"]

log = logging.getLogger("idglow")
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_ITEMS = ("checkpoints", "final", "logs", "validation", "config.yaml")  # what a run writes (--overwrite removes it)


@dataclass
class Checkpoint:
    """The content of one checkpoint folder. Tensors are on the CPU."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    path: Path | None = None


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` to ``<output_dir>/checkpoints/step-XXXXXXXX`` through a temp folder and a rename, then
    delete all but the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ckpt.step:08d}"
    tmp = root / f".tmp-step-{ckpt.step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(ckpt.trainable), str(tmp / "trainable.safetensors"))
    if ckpt.ema is not None:
        save_file(_contiguous(ckpt.ema), str(tmp / "ema.safetensors"))
    if ckpt.optimizer is not None:
        torch.save(ckpt.optimizer, tmp / "optimizer.pt")
    state = {**ckpt.state, "step": ckpt.step, "format_version": FORMAT_VERSION}
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a killed save of an earlier process
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (safetensors / weights_only only)."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file() or not (path / "trainable.safetensors").is_file():
        raise ModelFormatError(f"'{path}' is not a complete IdGlow checkpoint (needs state.json and "
                               f"trainable.safetensors). Pass a 'checkpoints/step-*' folder or --resume latest.")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"Checkpoint '{path}' has format version {state.get('format_version')}, this "
                               f"IdGlow reads {FORMAT_VERSION}. Resume it with the IdGlow version that wrote it.")
    opt_file, ema_file = path / "optimizer.pt", path / "ema.safetensors"
    return Checkpoint(step=int(state["step"]), trainable=load_file(str(path / "trainable.safetensors")),
                      optimizer=torch.load(opt_file, map_location="cpu", weights_only=True) if opt_file.is_file() else None,
                      ema=load_file(str(ema_file)) if ema_file.is_file() else None, state=state, path=path)


def prepare_output_dir(output_dir: str | Path, *, resume: str = "", overwrite: bool = False) -> Path | None:
    """Apply the output-folder rules; return the checkpoint folder to resume from, or None.

    - ``resume="latest"``: the newest checkpoint in ``output_dir`` (ConfigError if there is none).
    - ``resume=<path>``: that checkpoint folder.
    - otherwise a non-empty ``output_dir`` is refused unless ``overwrite`` (which deletes only what a run
      writes: checkpoints/, final/, logs/, validation/, config.yaml).
    """
    out = Path(output_dir)
    if resume:
        ckpt = latest_checkpoint(out) if resume == "latest" else Path(resume)
        if ckpt is None:
            raise ConfigError(f"--resume latest: no checkpoint found in '{out / 'checkpoints'}'. Start a new run "
                              f"without --resume, or point run.output_dir at the run to continue.")
        if not (ckpt / "state.json").is_file():
            raise ConfigError(f"--resume {resume}: '{ckpt}' is not a checkpoint folder (no state.json).")
        return ckpt
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"Output folder '{out}' already exists and is not empty. Choose a new "
                              f"run.output_dir, continue it with --resume latest, or pass --overwrite.")
        for name in RUN_ITEMS:
            item = out / name
            if item.is_dir():
                shutil.rmtree(item)
            elif item.exists():
                item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None
