"""``python -m idglow_core generate``: reference portraits -> a group photo with IdGlow.

    python -m idglow_core generate --model DIR_OR_HF_ID --adapter idglow.safetensors \\
        --refs a.jpg b.jpg --task group --out out.png --seed 0 [--steps 40]

Without ``--adapter`` the base model runs; identity then comes from the training-free options:
``--candidates N [--keep M] [--prune-at T]`` (Hungarian best-of-N / seed search with early pruning, needs a face
backend) and ``--id-guidance STRENGTH`` (identity guidance in the Omega(t) window, needs insightface buffalo_l).

Writes the image atomically and ``out.json`` next to it (schedule, weights, prompt, faces used, the search's
ranking and step log). With ``--keep M > 1`` the other kept images go to ``out-2.png`` ... ``out-M.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from ..errors import InputError

HELP = "Generate a group photo (Task 1) or an age-transformed group (Task 2) with IdGlowPipeline."
log = logging.getLogger("idglow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Qwen-Image-Edit-2511 folder (diffusers layout) or HF id")
    parser.add_argument("--adapter", default=None, help="IdGlow adapter .safetensors (default: none, base model)")
    parser.add_argument("--refs", nargs="+", required=True, help="reference portraits, one per person, left to right")
    parser.add_argument("--task", default="group", choices=["group", "age"],
                        help="group = direct group fusion (anneal); age = the same people as children (gate)")
    parser.add_argument("--out", required=True, help="output image path (.png/.jpg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="denoising steps")
    parser.add_argument("--prompt", default=None, help="prompt (default: the task's static template)")
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (1 = off)")
    parser.add_argument("--weight", type=float, default=1.0, help="identity strength")
    parser.add_argument("--id-weights", type=float, nargs="+", default=None, help="one strength per reference")
    parser.add_argument("--schedule", default=None,
                        help="override the task schedule, e.g. 'gate(lo=0.3,hi=0.6)', 'anneal(tau=0.2)', 'constant'")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--face-backend", default="auto", choices=["auto", "insightface", "dlib"])
    parser.add_argument("--face-model-dir", default=None, help="insightface buffalo_l folder")
    parser.add_argument("--embeddings", default=None, help="precomputed [k, d] face embeddings (.npy) instead "
                                                           "of detecting faces")
    parser.add_argument("--candidates", type=int, default=1, help="best-of-N: seeds seed .. seed+N-1, ranked by "
                                                                      "Hungarian FaceSim (idglow_core.bestof)")
    parser.add_argument("--keep", type=int, default=1, help="how many of the candidates to finish and save")
    parser.add_argument("--prune-at", type=float, default=None,
                        help="seed search: flow time t_p in (0, 1) at which the candidates' one-step estimates are "
                             "scored; only --keep of them are finished")
    parser.add_argument("--id-guidance", type=float, default=0.0,
                        help="identity guidance strength (latent L2 step at Omega = 1; 0 = off). Needs insightface")
    parser.add_argument("--guidance-schedule", default=None,
                        help="Omega(t) of the guidance (default: the task's), e.g. 'gate(lo=0.3,hi=0.6)'")
    parser.add_argument("--guidance-margin", type=int, default=4, help="latent cells around each face window")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on cuda, fp32 on cpu")


def _write_json_atomic(data: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..images import save_image_atomic
    from ..pipeline import GenerateConfig, IdGlowPipeline

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"--out {out} should end in .png, .jpg or .webp.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    embeddings = None
    if args.embeddings:
        from ..id_encoder import check_finite

        try:
            embeddings = np.load(args.embeddings, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"--embeddings {args.embeddings}: cannot read it as a .npy array ({exc}). Save the "
                             f"[k, d] embeddings with numpy.save.") from None
        check_finite(embeddings, f"--embeddings {args.embeddings}", "Recompute them; rows are references in order.")
    guidance = None
    if args.id_guidance > 0:
        from ..guidance import GuidanceConfig
        guidance = GuidanceConfig(strength=args.id_guidance, schedule=args.guidance_schedule,
                                  margin=args.guidance_margin)
    config = GenerateConfig(task=args.task, prompt=args.prompt, negative_prompt=args.negative_prompt,
                            weight=args.weight, id_weights=args.id_weights, schedule=args.schedule,
                            steps=args.steps, true_cfg_scale=args.cfg, height=args.height, width=args.width,
                            seed=args.seed, candidates=args.candidates, keep=args.keep, prune_at=args.prune_at,
                            id_guidance=guidance)
    needs_faces = embeddings is None or args.candidates > 1 or guidance is not None
    if args.adapter is None and not needs_faces:
        log.warning("No --adapter, --candidates or --id-guidance: this is plain Qwen-Image-Edit sampling")
    pipe = IdGlowPipeline.from_pretrained(args.model, args.adapter, device=args.device, dtype=dtype,
                                          face_backend=args.face_backend if needs_faces else "none",
                                          face_model_dir=args.face_model_dir)
    result = pipe(args.refs, config, embeddings=embeddings)
    paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(2, len(result.images) + 1)]
    for image, path in zip(result.images, paths):
        save_image_atomic(np.asarray(image), path)
    meta = {**result.metadata, "refs": [str(r) for r in args.refs], "model": str(args.model),
            "images": [str(p) for p in paths]}
    if args.adapter is not None:
        meta["adapter"] = {**result.metadata["adapter"], "path": str(args.adapter)}
    _write_json_atomic(meta, out.with_suffix(".json"))
    log.info("Wrote %s and %s", out, out.with_suffix(".json"))
    return 0
