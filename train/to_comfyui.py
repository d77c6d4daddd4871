"""Convert a fully fine-tuned DiT (diffusers ``transformer/`` folder) into one safetensors file for ComfyUI.

``run.train=full`` runs already write ``final/idglow_dit_comfyui.safetensors`` (bf16); this command converts
an existing ``transformer/`` folder (an older run, or another dtype) one tensor at a time::

    python train/to_comfyui.py runs/sft_full/final/transformer \\
        -o ComfyUI/models/diffusion_models/idglow_dit_bf16.safetensors [--dtype bf16|fp16|fp32]

Load the file in ComfyUI with "Load Diffusion Model" (UNETLoader); it is detected as Qwen-Image (and as
Qwen-Image-Edit-2511 when the config has ``zero_cond_t``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/to_comfyui.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train/to_comfyui.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("transformer", help="diffusers transformer folder (config.json + *.safetensors)")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="floating tensors' dtype")
    args = p.parse_args(argv)
    from idglow_core.errors import IdGlowError
    from idglow_core.training.comfy_export import convert_transformer_folder

    try:
        out = convert_transformer_folder(args.transformer, args.output, args.dtype)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
