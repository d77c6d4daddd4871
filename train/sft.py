"""IdGlow SFT trainer (paper Algorithm 1): flow-matching loss + dynamically modulated matched ID loss.

Examples (from the repository root)::

    # offline smoke run on CPU (tiny random models, synthetic data, < 2 min)
    python train/sft.py --config train/configs/tiny_cpu.yaml --output-dir runs/tiny --overwrite

    # real scale, one or many GPUs (DDP for adapter/LoRA; FSDP config for --train full)
    accelerate launch --config_file train/configs/accelerate_ddp_bf16.yaml train/sft.py \\
        --config train/configs/sft_qwen_edit_2511.yaml --manifest data/train.jsonl --task group

    # continue a run exactly where its last checkpoint left off
    accelerate launch train/sft.py --config runs/sft/config.yaml --resume latest

Ablations: ``--id-weight 0`` (w/o ID loss), ``--schedule constant`` (constant ID loss). Any config key can be
overridden with ``--set section.key=value`` (e.g. ``--set optim.lr=5e-5``). Outputs land in
``<output_dir>/final``: ``idglow_adapter.safetensors`` (+ ``pytorch_lora_weights.safetensors`` or
``transformer/``), loadable by the IdGlow nodes, ``IdGlowPipeline`` and diffusers.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/sft.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idglow_core.errors import IdGlowError  # noqa: E402

# flag -> config key; the flags are shortcuts for --set
FLAGS = {"manifest": "data.manifest", "task": "loss.task", "schedule": "loss.schedule", "id_weight": "loss.id_weight",
         "train": "run.train", "output_dir": "run.output_dir", "max_steps": "optim.max_steps",
         "resume": "run.resume", "mixed_precision": "run.mixed_precision", "seed": "run.seed",
         "lr": "optim.lr", "cache_dir": "data.cache_dir"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/sft.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config (see train/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--manifest", help="JSONL training manifest")
    p.add_argument("--task", choices=["group", "age"], help="group: anneal schedule (Eq. 4); age: gate (Eq. 5)")
    p.add_argument("--schedule", help="ID-loss schedule overriding the task's, e.g. constant, 'anneal(tau=0.2)'")
    p.add_argument("--id-weight", type=float, help="lambda_base of Eq. 1 (0 = w/o ID loss)")
    p.add_argument("--train", choices=["adapter", "lora", "full"], help="what to train besides the adapter")
    p.add_argument("--output-dir", help="run folder (checkpoints/, final/, logs/)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--cache-dir", help="cache text embeddings and latents here")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder (deletes its run files)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the shortcut flags that were given, as ``section.key=value`` strings."""
    out = list(args.set)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.overwrite:
        out.append("run.overwrite=true")
    if args.gradient_checkpointing:
        out.append("run.gradient_checkpointing=true")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from idglow_core.training import load_config, run_sft

    try:
        cfg = load_config(args.config, overrides_from_args(args))
        result = run_sft(cfg)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.final_dir is not None:
        logging.getLogger("idglow").info("done: %d steps, weights in %s", result.step, result.final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
