"""IdGlow group-level DPO trainer (paper §3.4, Eq. 6-7): weighted-margin Diffusion-DPO for flow matching.

Examples (from the repository root)::

    # offline smoke run on CPU (tiny random models, synthetic pairs, < 1 min)
    python train/dpo.py --config train/configs/dpo_tiny_cpu.yaml --output-dir runs/tiny_dpo --overwrite

    # real scale, from an SFT run, one or many GPUs (DDP)
    accelerate launch --config_file train/configs/accelerate_ddp_bf16.yaml train/dpo.py \\
        --config train/configs/dpo_tiny_cpu.yaml --set model.tiny=false --set model.pretrained=models/2511 \\
        --init-from runs/sft/final --manifest data/pairs/manifest.jsonl --beta 2500

    # continue a run exactly where its last checkpoint left off
    accelerate launch train/dpo.py --config runs/dpo/config.yaml --resume latest

The reference policy is the same network with the IdGlow adapter and the LoRA switched off (no second model
copy); ``--train full`` is refused. ``--alpha``, ``--margin``, ``--sft-weight`` are Eq. 7's alpha, m and
lambda_SFT (1, 0, 0 = plain Diffusion-DPO). Any key: ``--set section.key=value`` (``--set dpo.beta=1000``).
Outputs in ``<output_dir>/final`` have the SFT trainer's format.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/dpo.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idglow_core.errors import IdGlowError  # noqa: E402

# flag -> config key; the flags are shortcuts for --set
FLAGS = {"manifest": "data.manifest", "init_from": "dpo.init_from", "beta": "dpo.beta", "alpha": "dpo.alpha",
         "margin": "dpo.margin", "sft_weight": "dpo.sft_weight", "train": "run.train",
         "output_dir": "run.output_dir", "max_steps": "optim.max_steps", "resume": "run.resume",
         "mixed_precision": "run.mixed_precision", "seed": "run.seed", "lr": "optim.lr",
         "cache_dir": "data.cache_dir"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/dpo.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config with a dpo: section (see train/configs/dpo_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--manifest", help="JSONL pair manifest {chosen, rejected, refs, prompt, task}")
    p.add_argument("--init-from", help="SFT run / final folder, checkpoint folder, or adapter .safetensors")
    p.add_argument("--beta", type=float, help="Eq. 7 beta")
    p.add_argument("--alpha", type=float, help="Eq. 7 asymmetric weight on the chosen pair (1 = symmetric)")
    p.add_argument("--margin", type=float, help="Eq. 7 additive margin m >= 0")
    p.add_argument("--sft-weight", type=float, help="Eq. 7 lambda_SFT >= 0")
    p.add_argument("--train", choices=["adapter", "lora"], help="what to train besides the adapter")
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
    from idglow_core.training.dpo import load_dpo_config, run_dpo

    try:
        result = run_dpo(load_dpo_config(args.config, overrides_from_args(args)))
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.final_dir is not None:
        logging.getLogger("idglow").info("done: %d steps, weights in %s", result.step, result.final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
