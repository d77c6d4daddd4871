"""``loss.id_decode: crop`` vs ``full`` on the Qwen-Image VAE: the ArcFace crop of each face's window decode
against the same crop of the full decode, per margin. Prints JSON (issue 12, point 9).

Default: the real VAE architecture (``AutoencoderKLQwenImage()``: the Qwen-Image / 2511 config, base_dim 96,
z_dim 16, mid-block self-attention) with random weights, on CPU at a modest size. Random weights say whether
the architecture permits an exact window decode, not how large the error is with trained weights; measure
that with the real VAE before choosing ``crop`` for a real run:

    python bench/crop_decode_fidelity.py                                   # random weights, 256 px, ~2 min CPU
    python bench/crop_decode_fidelity.py --vae models/Qwen-Image-Edit-2511/vae --size 1024 \\
        --image tests/data/obama.jpg --device cuda --dtype bf16            # the real weights

Latents: the VAE's encoding of ``--image`` (resized to ``--size``), normalised as the trainer does, or
``--latents random`` (unit Gaussian in normalised space). Faces: ``--faces`` faces of ``--face-px`` pixels
(the ArcFace crop's span) along the image diagonal. The decision rule the README states: use ``crop`` only
when, on real weights, the face crops' mean error stays below ``--threshold`` (default 2/255) at the margin
the config uses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="", help="diffusers VAE folder (real weights); default: random real config")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 16)")
    p.add_argument("--image", default=str(ROOT / "tests" / "data" / "obama.jpg"))
    p.add_argument("--latents", choices=["image", "random"], default="image")
    p.add_argument("--faces", type=int, default=2)
    p.add_argument("--face-px", type=int, default=0, help="face crop span in pixels (default size / 3)")
    p.add_argument("--margins", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--threshold", type=float, default=2 / 255, help="mean abs error allowed for crop (0..1 units)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build_vae(path: str, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKLQwenImage

    if path:
        return AutoencoderKLQwenImage.from_pretrained(path, torch_dtype=dtype).eval()
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage().to(dtype).eval()  # the defaults are the Qwen-Image VAE config


@torch.no_grad()
def make_latents(vae, args) -> torch.Tensor:
    """``[1, 16, 1, size/8, size/8]`` normalised latents (as ``encode.SampleEncoder.encode_image``)."""
    h = args.size // vae.spatial_compression_ratio
    if args.latents == "random":
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn(1, vae.config.z_dim, 1, h, h, generator=g).to(vae.device, vae.dtype)
    from PIL import Image

    img = Image.open(args.image).convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1.0
    lat = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    return (lat - mean) / std


def measure(vae, args) -> dict:
    from idglow_core.training.crop_fidelity import crop_decode_error, face_keypoints
    from idglow_core.training.sft import vae_decoder

    latents = make_latents(vae, args)
    face_px = args.face_px or args.size // 3
    centers = np.linspace(face_px * 0.6, args.size - face_px * 0.6, args.faces)
    faces = [face_keypoints((float(c), float(c)), face_px) for c in centers]
    t0 = time.perf_counter()
    rows = crop_decode_error(vae_decoder(vae), latents, faces, args.margins)
    by_margin = {}
    for m in args.margins:
        mine = [r for r in rows if r["margin"] == m]
        by_margin[str(m)] = {"mean_abs": float(np.mean([r["mean_abs"] for r in mine])),
                             "max_abs": max(r["max_abs"] for r in mine),
                             "window_frac": float(np.mean([r["window_frac"] for r in mine]))}
    return {"vae": args.vae or "random weights, AutoencoderKLQwenImage() (real Qwen-Image config)",
            "size": args.size, "latents": args.latents, "face_px": face_px, "dtype": args.dtype,
            "device": args.device, "rows": rows, "by_margin": by_margin, "threshold_mean_abs": args.threshold,
            "crop_ok_by_margin": {m: v["mean_abs"] <= args.threshold for m, v in by_margin.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vae = build_vae(args.vae, dtype, args.seed).to(args.device)
    print(json.dumps(measure(vae, args), indent=1))


if __name__ == "__main__":
    main()
