"""What the trainer command lines (``train/sft.py``, ``train/dpo.py``) share: the run flags, turning flags into
``section.key=value`` overrides, and running with typed errors turned into exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import IdGlowError

__all__ = ["RUN_FLAGS", "add_run_arguments", "overrides_from_args", "run_main"]

# flag -> config key, for the flags every trainer has; the flags are shortcuts for --set
RUN_FLAGS = {"manifest": "data.manifest", "output_dir": "run.output_dir", "max_steps": "optim.max_steps",
             "resume": "run.resume", "mixed_precision": "run.mixed_precision", "seed": "run.seed",
             "lr": "optim.lr", "cache_dir": "data.cache_dir", "train": "run.train"}


def add_run_arguments(p: argparse.ArgumentParser, train_choices: list[str]) -> None:
    """Flags shared by every trainer (config, overrides, output folder, optimisation, resume, precision)."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--train", choices=train_choices, help="what to train besides the adapter")
    p.add_argument("--output-dir", help="run folder (checkpoints/, final/, logs/)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--cache-dir", help="cache text embeddings and latents here")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder holding an IdGlow run (removes only that run's files, after "
                        "every check passed)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume even though data, model, loss or seed differ from the checkpoint's (recorded)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")


def overrides_from_args(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``--set`` items plus the shortcut flags that were given, as ``section.key=value`` strings."""
    out = list(args.set)
    for flag, key in {**RUN_FLAGS, **flags}.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.overwrite:
        out.append("run.overwrite=true")
    if args.allow_config_change:
        out.append("run.allow_config_change=true")
    if args.gradient_checkpointing:
        out.append("run.gradient_checkpointing=true")
    return out


def run_main(args: argparse.Namespace, run: Callable[[], object]) -> int:
    """Set up logging, call ``run()`` (which returns a LoopResult); a typed error prints and exits with 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run()
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(result, "final_dir", None) is not None:
        logging.getLogger("idglow").info("done: %d steps, weights in %s", result.step, result.final_dir)
    return 0
