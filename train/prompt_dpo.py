"""Badcase-driven preference alignment of the prompt enricher M_P (paper §3.2): trl DPO with a LoRA on the VLM.

    python train/prompt_dpo.py --config train/configs/prompt_dpo_tiny_cpu.yaml         # offline, CPU, seconds
    python train/prompt_dpo.py --config my.yaml --model models/LLM/Qwen3-VL-8B-Instruct \
        --pairs data/prompt_pairs.jsonl --output-dir runs/prompt_dpo --max-steps 500

Every PromptDPOConfig field (idglow_core/prompting/alignment.py) is a flag that overrides the YAML, spelled with
dashes like the other trainers' flags (``--output-dir``; the underscore spelling ``--output_dir`` still works);
values are parsed as YAML (``--target-modules "[q_proj, v_proj]"``). A folder holding a previous run is refused
unless ``--resume`` (continue from its newest checkpoint) or ``--overwrite`` (remove only that run's files, once
the pairs and the model loaded). The pair format is in idglow_core/prompting/pairs.py.
The LoRA lands in <output_dir>/lora; load it with the IdGlowVLMLoader node or ``load_vlm(model, lora=...)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idglow_core.errors import IdGlowError  # noqa: E402
from idglow_core.prompting.alignment import PromptDPOConfig, load_config, train_prompt_dpo  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of PromptDPOConfig keys")
    for f in dataclasses.fields(PromptDPOConfig):
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])  # dashes; old spelling kept
        extra = {"nargs": "?", "const": True} if f.type == "bool" else {}  # `--overwrite` alone means true
        parser.add_argument(*names, dest=f.name, type=yaml.safe_load, default=None, help=f"override '{f.name}'",
                            **extra)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.pop("config"), **args)
        lora, history = train_prompt_dpo(config)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = next((h for h in reversed(history) if "loss" in h), {})
    logging.getLogger("idglow").info("done: LoRA %s; last loss %s, rewards/margins %s", lora, last.get("loss"),
                                     last.get("rewards/margins"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
