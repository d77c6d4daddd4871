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

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointWriteError, ConfigError, ModelFormatError

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "prepare_output_dir",
           "list_checkpoints", "RUN_ITEMS", "verify_checkpoint", "select_resume_checkpoint",
           "is_write_failure", "write_failure_message"]

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


def _write_checkpoint(root: Path, tmp: Path, final: Path, ckpt: Checkpoint) -> None:
    root.mkdir(parents=True, exist_ok=True)
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
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it, never lose both
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch.save and safetensors wrap ENOSPC in their own


def _errno(exc: BaseException, folder: Path) -> int | None:
    """The OS error behind a failed write: OSError's errno, 'os error N' in a safetensors message, or a guess
    from the folder (no space left, not writable)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return int(found.group(1))
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if shutil.disk_usage(probe).free < 64 << 20:
            return errno.ENOSPC
    except OSError:
        pass
    return None if os.access(probe, os.W_OK) else errno.EACCES


def is_write_failure(exc: BaseException, folder: Path) -> bool:
    """True when ``exc`` (raised while writing into ``folder``) comes from the file system, not from a bug."""
    return isinstance(exc, OSError) or (isinstance(exc, _WRITE_ERRORS) and _errno(exc, folder) is not None)


def write_failure_message(exc: BaseException, what: str, output_dir: str | Path) -> str:
    """What to tell a user whose save failed: the cause, that the newest checkpoint is intact, how to resume."""
    code = _errno(exc, Path(output_dir))
    cause = os.strerror(code) if code else "the write failed"
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota exceeded)"}.get(
        code, f"make '{output_dir}' writable" if code in (errno.EROFS, errno.EACCES, errno.EPERM) else "fix it")
    prev = latest_checkpoint(output_dir)
    kept = (f"The previous checkpoint '{prev}' is intact" if prev is not None else
            "No earlier checkpoint exists, so the run starts again from step 0")
    return (f"Could not write the {what}: {cause} ({type(exc).__name__}: {str(exc)[:200]}). {kept}; {fix}, then "
            f"continue with the same command plus --resume latest.")


def save_checkpoint(output_dir: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` to ``<output_dir>/checkpoints/step-XXXXXXXX`` through a temp folder and a rename, then
    delete all but the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{ckpt.step:08d}"
    tmp = root / f".tmp-step-{ckpt.step:08d}-{os.getpid()}"
    try:
        _write_checkpoint(root, tmp, final, ckpt)
    except _WRITE_ERRORS as exc:  # full disk, read-only folder, quota: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(exc, root):
            raise
        raise CheckpointWriteError(write_failure_message(exc, f"checkpoint {final}", output_dir)) from exc
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a killed save of an earlier process
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _damaged(path: Path, exc: BaseException | str) -> ModelFormatError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc)[:200]}"
    return ModelFormatError(f"Checkpoint file '{path}' is damaged ({detail}). It was probably cut short by a full "
                            f"disk or a copy that did not finish. Resume with --resume latest (it falls back to the "
                            f"newest intact checkpoint) or pass an older 'checkpoints/step-*' folder.")


def _read_state(path: Path) -> dict[str, Any]:
    state_file, weights = path / "state.json", path / "trainable.safetensors"
    if not state_file.is_file() or not weights.is_file():
        raise ModelFormatError(f"'{path}' is not a complete IdGlow checkpoint (needs state.json and "
                               f"trainable.safetensors). Pass a 'checkpoints/step-*' folder or --resume latest.")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(state_file, exc) from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"Checkpoint '{path}' has format version {state.get('format_version')}, this "
                               f"IdGlow reads {FORMAT_VERSION}. Resume it with the IdGlow version that wrote it.")
    return state


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Cheap integrity check of a checkpoint folder (its state, the safetensors headers against the file sizes,
    the optimizer archive's index), without reading the tensors. Returns its state; ModelFormatError names the
    damaged file."""
    path = Path(path)
    state = _read_state(path)
    for name in ("trainable.safetensors", "ema.safetensors"):
        if (path / name).is_file():
            try:
                with safe_open(str(path / name), "pt") as fh:
                    fh.keys()
            except Exception as exc:  # SafetensorError (truncated / empty / not safetensors), OSError
                raise _damaged(path / name, exc) from None
    if (path / "optimizer.pt").is_file():
        try:
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # truncated zip, unpickling error
            raise _damaged(path / "optimizer.pt", exc) from None
    return state


def select_resume_checkpoint(output_dir: str | Path, resume: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` continues from and its state. ``latest``: the newest intact one (a damaged
    newer one is named in a warning and skipped); a folder: that one (ModelFormatError if damaged)."""
    out = Path(output_dir)
    if resume != "latest":
        if not (Path(resume) / "state.json").is_file():
            raise ConfigError(f"--resume {resume}: '{resume}' is not a checkpoint folder (no state.json).")
        return Path(resume), verify_checkpoint(resume)
    damaged = []
    for ckpt in reversed(list_checkpoints(out)):
        try:
            state = verify_checkpoint(ckpt)
        except ModelFormatError as exc:
            log.warning("--resume latest: skipping %s: %s", ckpt, exc)
            damaged.append(str(ckpt))
            continue
        if damaged:
            log.warning("--resume latest: falling back to %s (step %d), the newest intact checkpoint; damaged: %s",
                        ckpt, int(state["step"]), ", ".join(damaged))
        return ckpt, state
    if damaged:
        raise ModelFormatError(f"--resume latest: every checkpoint in '{out / 'checkpoints'}' is damaged "
                               f"({', '.join(damaged)}); see the warnings above for the files. Start a new run.")
    raise ConfigError(f"--resume latest: no checkpoint found in '{out / 'checkpoints'}'. Start a new run without "
                      f"--resume, or point run.output_dir at the run to continue.")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (safetensors / weights_only only).
    A damaged file raises ModelFormatError naming it."""
    path = Path(path)
    state = _read_state(path)

    def read(name: str, loader):
        file = path / name
        if not file.is_file():
            return None
        try:
            return loader(file)
        except Exception as exc:  # SafetensorError, truncated zip, unpickling error
            raise _damaged(file, exc) from None

    trainable = read("trainable.safetensors", lambda f: load_file(str(f)))
    optimizer = read("optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    return Checkpoint(step=int(state["step"]), trainable=trainable, optimizer=optimizer,
                      ema=read("ema.safetensors", lambda f: load_file(str(f))), state=state, path=path)


def prepare_output_dir(output_dir: str | Path, *, resume: str = "", overwrite: bool = False) -> Path | None:
    """Apply the output-folder rules (:mod:`.run_dir`) and, unless resuming, clear the run files ``overwrite``
    allows; return the checkpoint folder to resume from, or None.

    - ``resume="latest"``: the newest intact checkpoint in ``output_dir`` (ConfigError if there is none).
    - ``resume=<path>``: that checkpoint folder.
    - otherwise an ``output_dir`` with a finished run is refused unless ``overwrite`` (which deletes only what a
      run writes: checkpoints/, final/, logs/, validation/, config.yaml); a folder IdGlow did not write is
      refused either way.
    """
    from .run_dir import plan_run

    plan = plan_run(output_dir, resume=resume, overwrite=overwrite)
    for item in plan.clear:
        if item.is_dir():
            shutil.rmtree(item)
        elif item.exists():
            item.unlink()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return plan.resume_from
