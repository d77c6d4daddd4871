"""Cost of the SFT ID loss (Algorithm 1 lines 13-14) on the tiny model, and how often it runs. Prints JSON.

Each variant runs in its own process (so peak memory is its own): the tiny Qwen-Image-Edit stack with the
IdGlow adapter + LoRA, one SFT step = forward, loss, backward, AdamW step. ``flow_only`` has id_weight 0;
``with_id`` forces the ID loss on every step (schedule ``constant``): decode the one-step estimate with the
VAE, detect faces (a stub returning 2 fixed keypoint sets whose aligned crops each span a quarter of the image
side, as in a group photo, so crop + ArcFace + Hungarian always run; a real detector on a random tiny model
finds nothing), tiny random ArcFace. ``with_id_crop`` is ``with_id`` with ``loss.id_decode=crop``: a no-grad
decode for detection, then a decode with gradient of each face's latent window only (``--margin`` cells
around its crop). Peak memory: max RSS growth over the post-setup baseline on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

The second part samples 200k flow times exactly as the trainer does and reports the fraction whose
Omega(t) > 0, i.e. the steps that pay for the decode, per schedule and timestep scheme.

    python bench/bench_sft.py                 # CPU, ~1 min
    python bench/bench_sft.py --size 256 --reps 5   # where crop vs full shows on CPU, ~2 min
    python bench/bench_sft.py --device cuda --size 256 --reps 20
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SCHEDULES = ["anneal(tau=0.3)", "gate(lo=0.3,hi=0.6)", "constant", "none"]
VARIANTS = ["flow_only", "with_id", "with_id_crop"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="target side in pixels (latent side = size / 4 tiny)")
    p.add_argument("--reps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--margin", type=int, default=4, help="loss.id_crop_margin (latent cells) for with_id_crop")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args()


def _batch(size: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    h = size // 4  # tiny VAE: x4 spatial
    emb = torch.nn.functional.normalize(torch.randn(1, 2, 8, generator=g), dim=-1)
    return {"latents": torch.randn(1, 4, 1, h, h, generator=g).to(device),
            "ref_latents": [torch.randn(1, 4, 1, h, h, generator=g).to(device) for _ in range(2)],
            "prompt_embeds": torch.randn(1, 12, 16, generator=g).to(device),
            "prompt_mask": torch.ones(1, 12, dtype=torch.long, device=device), "id_embeds": emb.to(device),
            "id_mask": torch.ones(1, 2, dtype=torch.bool, device=device),
            "ref_face_embeds": [torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)]}


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args: argparse.Namespace) -> dict:
    from idglow_core.faces.align import arcface_template
    from idglow_core.training.config import load_config
    from idglow_core.training.identity import IdentityLoss, tiny_arcface
    from idglow_core.training.models import build_train_module
    from idglow_core.training.sft import SFTStep, vae_decoder
    from idglow_core.testing import tiny_edit_pipeline

    torch.set_num_threads(args.threads)
    with_id = args.variant != "flow_only"
    decode_mode = "crop" if args.variant == "with_id_crop" else "full"
    cfg = load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml",
                      ["loss.schedule=constant", f"loss.id_weight={0.05 if with_id else 0}",
                       f"loss.id_decode={decode_mode}", f"loss.id_crop_margin={args.margin}"])
    pipe = tiny_edit_pipeline(text_encoder=False).to(args.device)
    torch.manual_seed(0)
    module = build_train_module(cfg, pipe, id_dim=8).to(args.device)
    s = args.size
    face = arcface_template(112) / 112 * (0.25 * s)  # 2 faces, each crop region a quarter of the side
    kps = [face + np.array([0.15, 0.3], np.float32) * s, face + np.array([0.55, 0.4], np.float32) * s]
    identity = IdentityLoss(lambda image: list(kps), tiny_arcface().to(args.device)) if with_id else None
    step = SFTStep(cfg.loss, vae_decoder(pipe.vae), identity, vae_decoder(pipe.vae, tiled=True))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = _batch(s, args.device)
    base = _peak_bytes(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(args.reps + 2):
        t0 = time.perf_counter()
        out = step(module, batch, torch.Generator().manual_seed(i))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "median_step_ms": round(statistics.median(times[2:]) * 1e3, 2),
            "min_step_ms": round(min(times[2:]) * 1e3, 2), "peak_mem_growth_mb": round((_peak_bytes(args.device) - base) / 2**20, 1),
            "id_loss_ran": "loss/id" in out.logs, "loss_id": out.logs.get("loss/id")}


def active_fractions(n: int = 200_000) -> dict:
    from idglow_core.losses import sample_timesteps
    from idglow_core.schedules import Schedule

    out = {}
    for scheme, shift in (("uniform", 1.0), ("logit_normal", 1.0), ("logit_normal", 2.0)):
        t = sample_timesteps(n, scheme=scheme, shift=shift, generator=torch.Generator().manual_seed(0))
        key = f"{scheme}" + ("" if shift == 1.0 else f"_shift{shift:g}")
        out[key] = {name: round(float((Schedule.parse(name)(t) > 0).float().mean()), 4) for name in SCHEDULES}
    return out


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--size", str(args.size),
               "--reps", str(args.reps), "--threads", str(args.threads), "--margin", str(args.margin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = results["with_id"]["median_step_ms"] / results["flow_only"]["median_step_ms"]
    full, crop = results["with_id"], results["with_id_crop"]
    report = {"device": args.device, "torch": torch.__version__, "target_px": args.size, "reps": args.reps,
              "threads": args.threads, "crop_margin": args.margin, "steps": results,
              "with_id_over_flow_only_time": round(ratio, 2),
              "crop_over_full_time": round(crop["median_step_ms"] / full["median_step_ms"], 2),
              "crop_over_full_peak_mem": round(crop["peak_mem_growth_mb"] / max(full["peak_mem_growth_mb"], 1e-9), 2),
              "id_loss_active_fraction": active_fractions(),
              "note": "tiny random models; 'with_id' uses a fixed-keypoint detector stub so crop+ArcFace run"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
