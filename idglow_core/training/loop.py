"""The training loop shared by every IdGlow trainer (SFT now, DPO later): only the step function differs.

A trainer hands :func:`run_loop` a :class:`LoopParts`: one ``nn.Module`` holding every trainable parameter
(its ``forward`` is what the step function calls, so DDP/FSDP see it), the encoded samples and their collate
function, a step function ``(module, batch, generator) -> StepOutput`` and an export function. The loop does
the rest: accelerate (DDP / FSDP / mixed precision), gradient accumulation, clipping, warm-up, EMA, logging,
atomic checkpoints and exact resume.

A DPO trainer plugs in the same way: its samples carry chosen/rejected latents, its step function draws one
t and noise for the pair, runs the policy with grad and the reference (LoRA/adapter off) under no_grad, and
returns ``losses.weighted_margin_dpo_loss`` with its metrics as logs; config, checkpoints and export are shared.

Determinism: sample order, noise and timesteps are derived from ``(seed, step, micro-batch, rank)``, so a
run resumed at step N draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate.utils import DistributedType

from .checkpoint import Checkpoint, is_write_failure, load_checkpoint, save_checkpoint, write_failure_message
from .config import TrainConfig, config_to_dict
from .ema import EMA
from .run_dir import RunPlan, claim_run, plan_run, trim_metrics
from .safety import NonFiniteGuard, refuse_nonfinite, verify_weights_file

__all__ = ["StepOutput", "StepFn", "LoopParts", "LoopResult", "run_loop", "derive_seed", "sample_indices",
           "MetricBuffer", "make_accelerator", "prepare_run", "check_run", "claim"]

log = logging.getLogger("idglow")


@dataclass
class StepOutput:
    """What a step function returns: the scalar loss to backpropagate and metrics (a float, or a list of
    observations that are averaged over the logging window).

    ``run_backward``: for a step that back-propagates in parts (DPO ``sequential``), the loop calls
    ``run_backward(backward)`` instead of back-propagating ``loss`` (then only logged); the step calls
    ``backward(part, last)`` per part, ``last=True`` on its final one (gradients sync there).
    """

    loss: torch.Tensor
    logs: dict[str, float | list[float]] = field(default_factory=dict)
    run_backward: Callable[[Callable[[torch.Tensor, bool], None]], None] | None = None


class StepFn(Protocol):
    def __call__(self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        ...


@dataclass
class LoopParts:
    """Everything trainer-specific the loop needs."""

    module: torch.nn.Module
    samples: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    step_fn: StepFn
    export: Callable[[torch.nn.Module, Path, dict], None]  # (unwrapped module, folder, full state) -> files
    validate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None  # (unwrapped module, step)
    config: dict | None = None  # the run's whole config as saved in checkpoints (default: config_to_dict(cfg))


@dataclass
class LoopResult:
    """``module`` is the unwrapped trained module (this process's copy); ``history`` the logged rows."""

    step: int
    final_dir: Path | None
    history: list[dict[str, float]]
    module: torch.nn.Module | None = None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_indices(n: int, seed: int, micro_index: int, rank: int, world: int, batch: int) -> list[int]:
    """Dataset indices of one micro-batch: a fresh permutation per epoch, ranks take disjoint slices."""
    out = []
    for g in range((micro_index * world + rank) * batch, (micro_index * world + rank + 1) * batch):
        epoch, pos = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
        out.append(int(perm[pos]))
    return out


class MetricBuffer:
    """Running sums and counts per metric name over a logging window."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, float | list[float]]) -> None:
        for key, value in logs.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            self.sums[key] = self.sums.get(key, 0.0) + float(sum(values))
            self.counts[key] = self.counts.get(key, 0) + len(values)

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.sums, self.counts = {}, {}
        return out


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def make_accelerator(cfg: TrainConfig):
    """The Accelerator of a run (launch settings come from ``accelerate launch`` / its config file)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    logging_dir = Path(cfg.run.output_dir) / "logs"
    return Accelerator(mixed_precision=cfg.run.mixed_precision, project_dir=str(logging_dir),
                       log_with="tensorboard" if cfg.run.tensorboard else None,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def _restore(ckpt_dir: Path, trainable: dict, optimizer, ema: EMA | None) -> int:
    ckpt = load_checkpoint(ckpt_dir)
    missing = sorted(set(trainable) - set(ckpt.trainable))
    if missing:
        from ..errors import ModelFormatError
        raise ModelFormatError(f"Checkpoint '{ckpt_dir}' lacks {len(missing)} trainable tensors (e.g. {missing[:3]}): "
                               f"it was written by a run with another run.train mode or model config.")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(ckpt.trainable[k].to(p.dtype))
    if ckpt.optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            from ..errors import ModelFormatError
            raise ModelFormatError(f"Checkpoint file '{ckpt_dir / 'optimizer.pt'}' is damaged or does not fit this "
                                   f"run's optimizer ({type(exc).__name__}: {str(exc)[:200]}). Resume from another "
                                   f"checkpoint folder, or delete that optimizer.pt to restart AdamW's moments "
                                   f"from zero.") from None
    else:
        log.warning("checkpoint %s has no optimizer state: AdamW moments restart from zero", ckpt_dir)
    if ema is not None and ckpt.ema is not None:
        ema.load_state_dict(ckpt.ema)
    log.info("resumed from %s at step %d", ckpt_dir, ckpt.step)
    return ckpt.step


def _save(acc, cfg: TrainConfig, module, optimizer, ema: EMA | None, step: int, record: dict | None = None) -> None:
    state = acc.get_state_dict(module)  # gathers under FSDP; plain state_dict under DDP
    sharded = acc.distributed_type == DistributedType.FSDP
    if sharded:
        log.warning("FSDP: the optimizer state is sharded and not saved; a resume restarts AdamW's moments.")

    def write() -> None:
        names = _trainable(acc.unwrap_model(module))
        trainable = {k: state[k] for k in names}
        refuse_nonfinite(trainable, f"checkpoint step {step}")  # never rotate good checkpoints out for NaN ones
        if ema is not None:
            refuse_nonfinite(ema.state_dict(), f"the EMA weights of checkpoint step {step}")
        ckpt = Checkpoint(step=step, trainable=trainable,
                          optimizer=None if sharded else optimizer.state_dict(),
                          ema=ema.state_dict() if ema else None,
                          state={"seed": cfg.run.seed, "config": record or config_to_dict(cfg)})
        save_checkpoint(cfg.run.output_dir, ckpt, keep=cfg.run.keep_checkpoints)
    _on_main(acc, write)


def _on_main(acc, fn: Callable[[], None]) -> None:
    """Run ``fn`` (a write) on the main process; when it raises a typed error, every rank stops with it (no
    rank is left waiting at a barrier)."""
    from ..errors import IdGlowError

    error = None
    if acc.is_main_process:
        try:
            fn()
        except IdGlowError as exc:
            error = exc
    failed = bool(acc.gather(torch.tensor([int(error is not None)], device=acc.device)).sum())
    if error is not None:
        raise error
    if failed:
        raise IdGlowError("The main process could not write a checkpoint or the final weights; its error says why "
                          "and how to resume. This process stops with it.")


def _full_state(acc, module, ema: EMA | None) -> dict[str, torch.Tensor]:
    """The module's full state (gathered under FSDP), with the EMA weights when EMA is on."""
    if ema is None:
        return acc.get_state_dict(module)
    live = _trainable(acc.unwrap_model(module))
    with ema.swapped_in(live):
        state = acc.get_state_dict(module)
        return {k: (v.detach().clone() if k in live else v) for k, v in state.items()}


def _export(acc, parts: LoopParts, cfg: TrainConfig, module, ema: EMA | None) -> Path | None:
    acc.wait_for_everyone()
    final = Path(cfg.run.output_dir) / "final"
    state = _full_state(acc, module, ema)  # every rank takes part in the gather
    _on_main(acc, lambda: _write_final(parts, cfg, acc.unwrap_model(module), state, final))
    return final


def _write_final(parts: LoopParts, cfg: TrainConfig, module, state: dict, final: Path) -> None:
    """``final/`` through a temporary folder and renames (the previous ``final/`` survives a failed write);
    non-finite weights and a failed write are typed errors."""
    from ..errors import CheckpointWriteError

    refuse_nonfinite(state, "the final weights", _trainable(module))
    tmp, old = final.with_name(f".tmp-final-{os.getpid()}"), final.with_name(f".old-final-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        parts.export(module, tmp, state)
        (tmp / "config.json").write_text(json.dumps(parts.config or config_to_dict(cfg), indent=1), encoding="utf-8")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)  # put the previous export back
        if not is_write_failure(exc, final.parent):
            raise
        raise CheckpointWriteError(write_failure_message(exc, f"final weights {final}", cfg.run.output_dir)) from exc
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported weights to %s", final)


def _micro_step(acc, parts: LoopParts, cfg: TrainConfig, module, step: int, micro: int, buf: MetricBuffer):
    accum = cfg.optim.grad_accum
    idx = sample_indices(len(parts.samples), cfg.run.seed, step * accum + micro, acc.process_index,
                         acc.num_processes, cfg.data.batch_size)
    batch = parts.collate([parts.samples[i] for i in idx])
    seed = derive_seed(cfg.run.seed, step, micro, acc.process_index)
    torch.manual_seed(seed)  # any global-RNG use inside the model (dropout) is reproducible too
    generator = torch.Generator().manual_seed(seed)
    out = parts.step_fn(module, batch, generator)

    def backward(loss: torch.Tensor, last: bool = True) -> None:
        if micro < accum - 1 or not last:
            with acc.no_sync(module):
                acc.backward(loss / accum)
        else:
            acc.backward(loss / accum)

    if out.run_backward is None:
        backward(out.loss)
    else:
        out.run_backward(backward)
    value = out.loss.item()
    buf.add({"loss/total": value, **out.logs})
    return value


def _optimizer_step(acc, cfg: TrainConfig, module, optimizer, ema: EMA | None, guard: NonFiniteGuard, step: int,
                    losses: list[float], buf: MetricBuffer) -> None:
    """Clip (when ``optim.max_grad_norm > 0``), check loss and gradient norm for NaN/inf (every rank decides
    alike), then step the optimizer and the EMA, or skip both (``optim.skip_nonfinite``) or stop the run."""
    norm = acc.clip_grad_norm_(module.parameters(), cfg.optim.max_grad_norm or float("inf"))  # inf: norm only
    norm = None if norm is None else float(norm)  # the total norm: the same value on every rank
    losses = acc.gather(torch.tensor(losses, device=acc.device)).tolist()
    if guard.check(step, losses, norm, _trainable(acc.unwrap_model(module))):
        optimizer.zero_grad(set_to_none=True)
        buf.add({"nonfinite/skipped": 1.0})
        return
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(_trainable(acc.unwrap_model(module)))
    if norm is not None:
        buf.add({"grad_norm": norm})


def _log_row(acc, row: dict[str, float], metrics_file: Path, bar) -> dict[str, float]:
    """Send one row of window means to the trackers (TensorBoard), metrics.jsonl and the progress bar."""
    acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if acc.is_main_process:
        try:
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:  # full disk: the next checkpoint save stops every rank with a typed error
            log.error("could not append step %d to %s (%s); training goes on", row["step"], metrics_file, exc)
        bar.set_postfix(loss=f"{row.get('loss/total', float('nan')):.4f}")
    return row


def check_run(cfg: TrainConfig, acc, config: dict | None = None, start_weights: dict[str, str] | None = None,
              trainer: str = "idglow") -> RunPlan:
    """Every rank, before any work: the output-folder rules, the checkpoint to resume from (intact, its config
    compared with ``config``, default ``config_to_dict(cfg)``) and the start weights (``{config key: file}``)
    read in full. Nothing is deleted; a missing or empty folder is marked as an IdGlow run folder."""
    for what, path in (start_weights or {}).items():
        if path:
            verify_weights_file(path, what)
    run = cfg.run
    plan = plan_run(run.output_dir, resume=run.resume, overwrite=run.overwrite,
                    config=config or config_to_dict(cfg), allow_changes=run.allow_config_change, trainer=trainer,
                    mark=acc.is_main_process)
    acc.wait_for_everyone()
    return plan


def claim(plan: RunPlan, cfg: TrainConfig, acc, config: dict | None = None) -> Path | None:
    """After the manifest, the models and the start weights passed: the main process clears what
    ``--overwrite`` removes and writes ``config.yaml``; returns the checkpoint to resume from, or None."""
    if acc.is_main_process:
        claim_run(plan, config or config_to_dict(cfg))
    acc.wait_for_everyone()
    return plan.resume_from


def prepare_run(cfg: TrainConfig, acc) -> Path | None:
    """:func:`check_run` and :func:`claim` at once (for callers with nothing to validate in between)."""
    return claim(check_run(cfg, acc), cfg, acc)


def run_loop(cfg: TrainConfig, parts: LoopParts, resume_from: Path | None = None, accelerator=None) -> LoopResult:
    """Train ``parts.module`` for ``cfg.optim.max_steps`` optimizer steps; checkpoint and export.

    ``resume_from``: a checkpoint folder (see :func:`check_run` / :func:`claim`). A non-finite loss or gradient
    stops the run with TrainingDivergedError (or skips the step, ``optim.skip_nonfinite``); non-finite weights are
    never saved or exported (:mod:`.safety`). Returns the final step, the export folder and the logged metrics
    (main process).
    """
    from tqdm.auto import tqdm

    acc = accelerator or make_accelerator(cfg)
    module = parts.module
    trainable = _trainable(module)
    if not trainable:
        from ..errors import ConfigError
        raise ConfigError("Nothing to train: the module has no parameter with requires_grad=True.")
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    ema = EMA(trainable, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    start = _restore(resume_from, trainable, optimizer, ema) if resume_from else 0
    module, optimizer = acc.prepare(module, optimizer)
    log.info("accelerate: %s, %d process(es), device %s, mixed precision %s, start step %d",
             acc.distributed_type, acc.num_processes, acc.device, acc.mixed_precision, start)
    if cfg.run.tensorboard:
        acc.init_trackers("idglow", config={k: str(v) for k, v in config_to_dict(cfg)["loss"].items()})
    metrics_file = Path(cfg.run.output_dir) / "logs" / "metrics.jsonl"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    if resume_from is not None and acc.is_main_process:
        trim_metrics(metrics_file, start)  # rows a stopped run logged after its checkpoint come again below
    guard = NonFiniteGuard(cfg.optim.skip_nonfinite, cfg.optim.lr, cfg.run.output_dir,
                           check_grads=acc.mixed_precision != "fp16")  # fp16: the grad scaler skips inf steps
    module.train()
    history, buf = [], MetricBuffer()
    bar = tqdm(total=cfg.optim.max_steps, initial=start, disable=not acc.is_main_process, desc="train")
    for step in range(start, cfg.optim.max_steps):
        lr = cfg.optim.lr * min(1.0, (step + 1) / max(1, cfg.optim.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = [_micro_step(acc, parts, cfg, module, step, micro, buf) for micro in range(cfg.optim.grad_accum)]
        _optimizer_step(acc, cfg, module, optimizer, ema, guard, step + 1, losses, buf)
        done = step + 1
        if parts.validate is not None and cfg.run.validate_every and done % cfg.run.validate_every == 0:
            if acc.distributed_type == DistributedType.FSDP:
                # sharded weights: every rank runs the wrapped module (its forward all-gathers the shards)
                metrics = parts.validate(module, done)
                if acc.is_main_process:
                    buf.add(metrics)
            elif acc.is_main_process:  # the unwrapped module: no DDP collectives on one rank
                buf.add(parts.validate(acc.unwrap_model(module), done))
            acc.wait_for_everyone()
        if done % cfg.run.log_every == 0 or done == cfg.optim.max_steps:
            history.append(_log_row(acc, {"step": done, "lr": lr, **buf.means()}, metrics_file, bar))
        bar.update(1)
        if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0 and done < cfg.optim.max_steps:
            _save(acc, cfg, module, optimizer, ema, done, parts.config)
    bar.close()
    if start < cfg.optim.max_steps or resume_from is None:
        _save(acc, cfg, module, optimizer, ema, cfg.optim.max_steps, parts.config)
    final = _export(acc, parts, cfg, module, ema)
    acc.end_training()
    return LoopResult(step=cfg.optim.max_steps, final_dir=final, history=history, module=acc.unwrap_model(module))
