"""Guards that keep a run from destroying good work: non-finite losses, gradients and weights are caught
(never saved, never exported), and start weights are read completely before anything is built.

Non-finite steps (``optim.skip_nonfinite``): 0 stops the run at the first step whose loss or gradient is not
finite; N > 0 skips such a step (no optimizer step, no EMA update, gradients dropped) and stops when N + 1 come
in a row. Either way the run ends with :class:`~idglow_core.errors.TrainingDivergedError` (exit code 2) naming the
step and the likely cause, and the checkpoints on disk are the last good ones.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import ModelFormatError, ModelNotFoundError, TrainingDivergedError

__all__ = ["NonFiniteGuard", "nonfinite_names", "refuse_nonfinite", "verify_weights_file", "cache_entry_ok"]

log = logging.getLogger("idglow")


def nonfinite_names(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> list[str]:
    """Names of the floating-point tensors (of ``names``, default all) holding a NaN or an infinity."""
    keys = tensors.keys() if names is None else [k for k in names if k in tensors]
    return [k for k in keys if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]


def refuse_nonfinite(tensors: Mapping[str, torch.Tensor], what: str, names: Iterable[str] | None = None) -> None:
    """Raise TrainingDivergedError when a tensor of ``tensors`` is not finite (before saving or exporting)."""
    bad = nonfinite_names(tensors, names)
    if bad:
        raise TrainingDivergedError(f"Refusing to write {what}: {len(bad)} tensor(s) hold NaN or inf (e.g. "
                                    f"{bad[:3]}). The weights diverged; the checkpoints already on disk are intact. "
                                    f"Lower optim.lr and continue with --resume latest.")


def verify_weights_file(path: str | Path, what: str) -> None:
    """Read every tensor of a safetensors start-weights file (``what``: the config key that names it); a
    missing (ModelNotFoundError), damaged or non-finite (ModelFormatError) file raises before any model is built."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{what}: '{path}' does not exist or is not a file. Point {what} at an adapter "
                                 f".safetensors file (e.g. <sft run>/final/idglow_adapter.safetensors).")
    try:
        with safe_open(str(path), "pt") as fh:
            bad = [k for k in fh.keys() if (t := fh.get_tensor(k)).is_floating_point() and not torch.isfinite(t).all()]
    except Exception as exc:  # SafetensorError: truncated, empty, not safetensors
        raise ModelFormatError(f"{what}: '{path}' is damaged or not a safetensors file ({type(exc).__name__}: "
                               f"{str(exc)[:200]}). Point {what} at an intact file (e.g. the run's final/ folder "
                               f"or another checkpoint).") from None
    if bad:
        raise ModelFormatError(f"{what}: '{path}' holds NaN or inf in {len(bad)} tensor(s) (e.g. {bad[:3]}): it "
                               f"comes from a diverged run. Start from an earlier checkpoint.")


def cache_entry_ok(path: Path | None, required: Iterable[str]) -> bool:
    """Whether an encoding cache file exists and is whole (its safetensors header covers the file and names every
    ``required`` key), checked from the header alone; a damaged file is reported, and the caller encodes again."""
    if path is None or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            missing = sorted(set(required) - set(f.keys()))
    except Exception as exc:  # SafetensorError: truncated / empty / not safetensors
        log.warning("cache entry %s is damaged (%s: %s); encoding the sample again", path, type(exc).__name__,
                    str(exc)[:120])
        return False
    if missing:
        log.warning("cache entry %s lacks %s; encoding the sample again", path, missing)
    return not missing


class NonFiniteGuard:
    """Watches each optimizer step's losses and gradient norm. :meth:`check` returns True when the step must be
    skipped, and raises TrainingDivergedError when the run must stop."""

    def __init__(self, patience: int, lr: float, output_dir: str | Path, check_grads: bool = True):
        self.patience, self.lr, self.output_dir, self.check_grads = patience, lr, Path(output_dir), check_grads
        self.in_a_row = 0
        self.last_good_norm: float | None = None
        self.steps_seen = 0

    def check(self, step: int, losses: list[float], grad_norm: float | None,
              trainable: Mapping[str, torch.Tensor]) -> bool:
        """``step``: the 1-based optimizer step; ``losses``: this step's micro-batch losses (all ranks);
        ``grad_norm``: the total gradient norm (None when not computed)."""
        self.steps_seen += 1
        loss_ok = all(math.isfinite(v) for v in losses)
        grad_ok = not self.check_grads or grad_norm is None or math.isfinite(grad_norm)
        if loss_ok and grad_ok:
            self.in_a_row = 0
            self.last_good_norm = grad_norm
            return False
        self.in_a_row += 1
        what = (f"the loss is {next(v for v in losses if not math.isfinite(v))}" if not loss_ok
                else f"the loss is finite but the gradient norm is {grad_norm}")
        if self.in_a_row <= self.patience:
            log.warning("step %d: %s; step skipped (%d of at most %d in a row, optim.skip_nonfinite)", step, what,
                        self.in_a_row, self.patience)
            return True
        raise TrainingDivergedError(self._message(step, what, loss_ok, trainable))

    def _message(self, step: int, what: str, loss_ok: bool, trainable: Mapping[str, torch.Tensor]) -> str:
        from .checkpoint import latest_checkpoint

        bad_weights = nonfinite_names(trainable)
        if bad_weights:
            cause = (f"the weights themselves became NaN/inf (e.g. {bad_weights[:2]}) after an optimizer step: "
                     f"optim.lr={self.lr:g} is far too high")
        elif self.steps_seen == 1:
            cause = ("the very first step of this run is non-finite: the start weights (model.init_adapter, "
                     "dpo.init_from, the checkpoint), the data or a loss setting hold NaN/inf")
        elif loss_ok:
            cause = (f"exploding gradients (last finite gradient norm {self.last_good_norm}): lower optim.lr="
                     f"{self.lr:g} and keep optim.max_grad_norm > 0")
        else:
            cause = (f"divergence (last finite gradient norm {self.last_good_norm}): optim.lr={self.lr:g} is "
                     f"probably too high, or a sample produces NaN")
        row = f" ({self.in_a_row} non-finite steps in a row)" if self.in_a_row > 1 else ""
        ckpt = latest_checkpoint(self.output_dir)
        kept = (f"The newest checkpoint '{ckpt}' is intact (nothing non-finite was saved)" if ckpt else
                "No checkpoint was saved before this step")
        return (f"Training stopped at step {step}: {what}{row}. Likely cause: {cause}. {kept}. Fix the cause, "
                f"then continue with --resume latest (optim.lr may change on resume), or let the run skip up to N "
                f"bad steps in a row with --set optim.skip_nonfinite=N.")
