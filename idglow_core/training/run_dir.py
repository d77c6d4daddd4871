"""Run folders: where a trainer may write, what ``--overwrite`` may remove, which checkpoint ``--resume`` picks
and what a resumed run may change.

Rules (every trainer: ``train/sft.py``, ``train/dpo.py``, ``train/prompt_dpo.py``):

- A run marks its folder with :data:`MARKER` (``.idglow-run.json``) before it writes anything else there, so
  IdGlow recognises its own folders (older runs: by their ``checkpoints/step-*`` or ``final/outputs.json``).
- A new run goes into a missing or empty folder, or into an IdGlow folder that holds no finished work (the
  leftovers of a start that failed). A folder with checkpoints or final weights needs ``--resume latest`` or
  ``--overwrite``; a non-empty folder IdGlow did not write is never touched, ``--overwrite`` or not.
- Everything is checked first (:func:`plan_run`, read-only); files are removed only when the trainer
  :func:`claim_run`\\ s the folder after the manifest, the config and the start weights passed. ``--overwrite``
  removes only what a run writes (the trainer's ``items``), never other files in the folder.
- ``--resume`` compares the checkpoint's config with the current one: a change of the data, the model, the
  loss, the seed or the train mode is refused unless ``run.allow_config_change`` (``--allow-config-change``);
  :data:`RESUME_MAY_CHANGE` (``max_steps``, ``lr``, logging, ...) changes freely. Every change is recorded in
  ``logs/config_changes.jsonl``.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

__all__ = ["MARKER", "RESUME_MAY_CHANGE", "RunPlan", "owned_by_idglow", "check_output_folder", "write_marker",
           "plan_run", "claim_run", "config_changes", "trim_metrics"]

log = logging.getLogger("idglow")
MARKER = ".idglow-run.json"
CHANGES_FILE = Path("logs") / "config_changes.jsonl"
# config keys a resumed run may change: how long, how fast, how it logs and saves; nothing that changes what
# the run learns from (data, model, loss, seed, train mode, batch, betas, EMA)
RESUME_MAY_CHANGE = frozenset({
    "optim.max_steps", "optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.max_grad_norm",
    "optim.skip_nonfinite", "data.cache_dir",
    "run.output_dir", "run.mixed_precision", "run.gradient_checkpointing", "run.checkpoint_every",
    "run.keep_checkpoints", "run.log_every", "run.validate_every", "run.validate_samples", "run.validate_steps",
    "run.tensorboard", "run.overwrite", "run.resume", "run.allow_config_change"})


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the checkpoint to resume from (or None), the run files ``--overwrite``
    removes at :func:`claim_run`, and the config keys that differ from the checkpoint's (``{key: [old, new]}``)."""

    output_dir: Path
    trainer: str = "idglow"
    resume_from: Path | None = None
    resume_step: int = 0
    clear: list[Path] = field(default_factory=list)
    changes: dict[str, list] = field(default_factory=dict)


def owned_by_idglow(out: Path) -> bool:
    """True when ``out`` was written by an IdGlow run: its marker, or (runs older than the marker) a
    checkpoint folder or an exported ``final/outputs.json``."""
    from .checkpoint import list_checkpoints

    return (out / MARKER).is_file() or bool(list_checkpoints(out)) or (out / "final" / "outputs.json").is_file()


def write_marker(out: Path, trainer: str) -> None:
    """Create ``out`` (if needed) and mark it as an IdGlow run folder."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"written_by": "IdGlow", "trainer": trainer,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"Output folder '{out}' cannot be created: '{probe}' is a file. Choose another "
                          f"run.output_dir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"Output folder '{out}' is not writable ('{probe}' is read-only for this user). "
                          f"Choose a writable run.output_dir or fix its permissions.")


def check_output_folder(out: Path, *, overwrite: bool, items: Iterable[str], finished: bool, trainer: str,
                        mark: bool = True) -> list[Path]:
    """The output-folder rules for a new (not resumed) run. Returns the run files ``--overwrite`` will remove
    (nothing is removed here). ``finished``: the folder holds checkpoints or final weights. ``mark``: mark a
    missing or empty folder now (the main process), so leftovers of a failed start never block a rerun."""
    out = Path(out)
    _check_writable(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        if mark:
            write_marker(out, trainer)
        return []
    if not owned_by_idglow(out):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"Output folder '{out}' already exists and is not empty ({shown}), and no IdGlow run "
                          f"wrote it (no {MARKER}): IdGlow never deletes files it did not write, --overwrite or "
                          f"not. Choose a new run.output_dir, or empty that folder yourself.")
    if finished and not overwrite:
        raise ConfigError(f"Output folder '{out}' already exists and is not empty (a previous run's checkpoints or "
                          f"final weights). Choose a new run.output_dir, continue it with --resume latest, or pass "
                          f"--overwrite (removes only that run's files).")
    return [out / name for name in items if (out / name).exists()]


def plan_run(output_dir: str | Path, *, resume: str = "", overwrite: bool = False, config: dict | None = None,
             allow_changes: bool = False, trainer: str = "idglow", mark: bool = True) -> RunPlan:
    """Apply the rules without deleting anything (see the module docstring). ``config``: the run's config as a
    nested dict (compared with the checkpoint's on resume)."""
    from .checkpoint import RUN_ITEMS, list_checkpoints, select_resume_checkpoint

    out = Path(output_dir)
    plan = RunPlan(output_dir=out, trainer=trainer)
    if not resume:
        finished = bool(list_checkpoints(out)) or (out / "final").exists()
        plan.clear = check_output_folder(out, overwrite=overwrite, items=RUN_ITEMS, finished=finished,
                                         trainer=trainer, mark=mark)
        return plan
    _check_writable(out)
    plan.resume_from, state = select_resume_checkpoint(out, resume)
    plan.resume_step = int(state["step"])
    old = state.get("config")
    if config is not None and isinstance(old, dict):
        plan.changes = config_changes(old, config)
        _refuse_breaking(plan, config, allow_changes)
    return plan


def _refuse_breaking(plan: RunPlan, config: dict, allow: bool) -> None:
    steps = (config.get("optim") or {}).get("max_steps")
    if isinstance(steps, int) and steps < plan.resume_step:
        raise ConfigError(f"--resume: checkpoint '{plan.resume_from}' is at step {plan.resume_step}, but "
                          f"optim.max_steps is {steps}. Pass --max-steps {plan.resume_step} or more to continue "
                          f"it (equal: export it again without training).")
    breaking = {k: v for k, v in plan.changes.items() if k not in RESUME_MAY_CHANGE}
    if breaking and not allow:
        shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in sorted(breaking.items()))
        raise ConfigError(f"--resume: the config differs from checkpoint '{plan.resume_from}' in what the run "
                          f"trains on ({shown}). Resume with the checkpoint's values (in its state.json and in "
                          f"{plan.output_dir / 'config.yaml'}), start a new run, or pass --allow-config-change "
                          f"(run.allow_config_change=true) to continue anyway; the change is then recorded in "
                          f"{plan.output_dir / CHANGES_FILE}.")


def claim_run(plan: RunPlan, config: dict) -> None:
    """Main process, after every check passed: remove the planned run files, mark the folder, write
    ``config.yaml`` and record what a resume changed."""
    import yaml

    out = plan.output_dir
    for item in plan.clear:
        if item.is_dir():
            shutil.rmtree(item)
        elif item.exists():
            item.unlink()
        log.info("--overwrite: removed %s", item)
    write_marker(out, plan.trainer)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config), encoding="utf-8")
    os.replace(tmp, out / "config.yaml")
    if plan.changes:
        shown = ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in sorted(plan.changes.items()))
        log.warning("resuming %s with config changes: %s (recorded in %s)", plan.resume_from, shown,
                    out / CHANGES_FILE)
        (out / CHANGES_FILE).parent.mkdir(parents=True, exist_ok=True)
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "checkpoint": str(plan.resume_from), "step": plan.resume_step, "changes": plan.changes}
        with open(out / CHANGES_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """``{"section.key": [old, new]}`` for every key both configs have and whose values differ (tuples and
    lists compare equal; keys only one side has, e.g. added by a newer IdGlow, are ignored)."""
    a, b = _flat(old), _flat(new)
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return {k: [a[k], b[k]] for k in sorted(set(a) & set(b)) if norm(a[k]) != norm(b[k])}


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``last_step`` (logged by a run that was stopped before its next
    checkpoint, and about to be logged again by the resumed run) and any half-written line. Returns how many
    rows were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: dropped %d row(s) after step %d (they are logged again)", path, dropped, last_step)
    return dropped
