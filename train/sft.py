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
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/sft.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idglow_core.training.cli import add_run_arguments, overrides_from_args, run_main  # noqa: E402

# flag -> config key (beyond the run flags every trainer has); the flags are shortcuts for --set
FLAGS = {"task": "loss.task", "schedule": "loss.schedule", "id_weight": "loss.id_weight",
         "injection": "loss.injection"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/sft.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config (see train/configs/)")
    p.add_argument("--manifest", help="JSONL training manifest")
    p.add_argument("--task", choices=["group", "age"], help="group: anneal schedule (Eq. 4); age: gate (Eq. 5). "
                   "Synthetic data's task and the adapter's default; manifest lines keep their own task")
    p.add_argument("--schedule", help="Omega overriding every task's (ID loss and injection), e.g. constant, "
                   "'anneal(tau=0.2)'")
    p.add_argument("--injection", choices=["schedule", "constant"],
                   help="ID residual strength in training: Omega(t) as deployed (default) or 1 at every t")
    p.add_argument("--id-weight", type=float, help="lambda_base of Eq. 1 (0 = w/o ID loss)")
    add_run_arguments(p, ["adapter", "lora", "full"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from idglow_core.training import load_config, run_sft

    return run_main(args, lambda: run_sft(load_config(args.config, overrides_from_args(args, FLAGS))))


if __name__ == "__main__":
    sys.exit(main())
