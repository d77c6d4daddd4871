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

The reference policy is the policy DPO starts from (``--reference start``: a frozen copy of the starting
adapter + LoRA, no second DiT), or the base DiT with both switched off (``--reference base``); ``--train full``
is refused. ``--alpha``, ``--margin``, ``--sft-weight`` are Eq. 7's alpha, m and lambda_SFT (1, 0, 0 = plain
Diffusion-DPO); the margin enters as ``-log sigmoid(x - m)`` (``--set dpo.margin_form=printed`` for Eq. 7's
typeset ``x + m``). ``--sequential`` runs chosen and rejected one after the other (same gradients, less memory).
Any key: ``--set section.key=value`` (``--set dpo.beta=1000``).
Outputs in ``<output_dir>/final`` have the SFT trainer's format.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/dpo.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idglow_core.training.cli import add_run_arguments, overrides_from_args, run_main  # noqa: E402

# flag -> config key (beyond the run flags every trainer has); the flags are shortcuts for --set
FLAGS = {"init_from": "dpo.init_from", "beta": "dpo.beta", "alpha": "dpo.alpha", "margin": "dpo.margin",
         "sft_weight": "dpo.sft_weight", "reference": "dpo.reference", "sequential": "dpo.sequential"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/dpo.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config with a dpo: section (see train/configs/dpo_*.yaml)")
    p.add_argument("--manifest", help="JSONL pair manifest {chosen, rejected, refs, prompt, task}")
    p.add_argument("--init-from", help="SFT run / final folder, checkpoint folder, or adapter .safetensors")
    p.add_argument("--beta", type=float, help="Eq. 7 beta")
    p.add_argument("--alpha", type=float, help="Eq. 7 asymmetric weight on the chosen pair (1 = symmetric)")
    p.add_argument("--margin", type=float, help="Eq. 7 additive margin m >= 0")
    p.add_argument("--sft-weight", type=float, help="Eq. 7 lambda_SFT >= 0")
    p.add_argument("--reference", choices=["start", "base"], help="DPO reference: the starting policy or the base DiT")
    p.add_argument("--sequential", action="store_const", const=True, default=None,
                   help="chosen and rejected forward+backward one at a time (less memory, same gradients)")
    add_run_arguments(p, ["adapter", "lora"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from idglow_core.training.dpo import load_dpo_config, run_dpo

    return run_main(args, lambda: run_dpo(load_dpo_config(args.config, overrides_from_args(args, FLAGS))))


if __name__ == "__main__":
    sys.exit(main())
