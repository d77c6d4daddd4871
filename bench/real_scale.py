"""Real-scale proof (issue 12, point 10): the Qwen-Image-Edit-2511 DiT config (60 blocks, width 3072, text width
3584, zero_cond_t) with random weights, through the trainers' own step code. Prints JSON.

Phases, each timed with its own peak memory (CUDA: ``max_memory_allocated`` after a reset; CPU: the process's
peak RSS so far, which cannot be reset):

- ``sft``: one adapter + LoRA SFT step (``training.sft.SFTStep``: flow loss + the ID loss on the decoded
  one-step estimate, ``loss.schedule=constant`` so the ID loss always runs), backward, AdamW step;
- ``dpo_joint``: one DPO step (``training.dpo.DPOStep``: reference pass + policy on chosen and rejected);
- ``dpo_sequential``: the same with ``dpo.sequential: true``, when this checkout's ``DPOConfig`` has that key
  (else skipped, with the reason in the JSON and on stderr);
- ``inference_adapter`` / ``inference_plain``: one no-grad DiT forward with and without the IdGlow adapter
  (the pipeline's path: ``adapter.condition`` + ``attention_kwargs``; one call per denoising step without CFG).

Stand-ins, stated: random bf16 weights; random latents / prompt embeddings at the real sizes (no text encoder:
trainers cache embeddings and free it); a fixed-keypoint face detector and the tiny random ArcFace (the real
R50 adds ~43 M parameters and a 112 px forward, small next to the DiT).

    python bench/real_scale.py --device cuda                       # full depth: needs a GPU with >= 80 GB
    python bench/real_scale.py --layers 2 --heads 2 --head-dim 16 --joint-dim 16 --vae tiny --resolution 64 \\
        --device cpu --dtype fp32                                   # the reduced CPU run the tests use
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--joint-dim", type=int, default=3584, help="text embedding width (Qwen2.5-VL-7B: 3584)")
    p.add_argument("--vae", choices=["real", "tiny"], default="real", help="real: AutoencoderKLQwenImage() config")
    p.add_argument("--resolution", type=int, default=1024, help="target and reference side in pixels")
    p.add_argument("--refs", type=int, default=2, help="reference images (= identities)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--id-decode", choices=["full", "crop"], default="full")
    p.add_argument("--gradient-checkpointing", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="frozen weights' dtype")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Meter:
    """Time and peak memory of one phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, out: dict, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = out.setdefault(name, {})
        yield row
        if self.cuda:
            torch.cuda.synchronize()
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        else:
            row["peak_rss_gb_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        row["seconds"] = round(time.perf_counter() - t0, 3)


def build_models(args, device: torch.device, dtype: torch.dtype):
    """The 2511 DiT config (depth/width from ``args``) and the VAE, random, frozen weights in ``dtype``."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from idglow_core.testing import tiny_vae

    torch.manual_seed(args.seed)
    vae = (AutoencoderKLQwenImage() if args.vae == "real" else tiny_vae(args.seed)).to(device, dtype).eval()
    z = vae.config.z_dim
    head = args.head_dim
    rope = (head // 8, head * 7 // 16, head * 7 // 16) if head % 32 == 0 else (head // 2, head // 4, head // 4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: 20 B params never exist in fp32
    try:
        with torch.device(device):
            dit = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=args.layers,
                                              attention_head_dim=head, num_attention_heads=args.heads,
                                              joint_attention_dim=args.joint_dim, guidance_embeds=False,
                                              axes_dims_rope=rope, zero_cond_t=True)
    finally:
        torch.set_default_dtype(previous)
    return dit, vae


def train_config(args, output_dir: str):
    from idglow_core.training.config import config_from_dict

    return config_from_dict({
        "model": {"tiny": True, "lora_rank": args.lora_rank, "lora_alpha": args.lora_rank, "tokens_per_id": 8,
                  "max_ids": max(4, args.refs)},
        "data": {"synthetic": 1, "resolution": args.resolution},
        "loss": {"schedule": "constant", "id_weight": 0.05, "id_decode": args.id_decode},
        "run": {"train": "lora", "output_dir": output_dir,
                "gradient_checkpointing": bool(args.gradient_checkpointing)}})


def make_batch(args, z: int, factor: int, id_dim: int, face_dim: int, device) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    h = args.resolution // factor
    lat = lambda: torch.randn(1, z, 1, h, h, generator=g)  # noqa: E731
    batch = {"latents": lat(), "latents_rejected": lat(), "ref_latents": [lat() for _ in range(args.refs)],
             "prompt_embeds": torch.randn(1, args.prompt_tokens, args.joint_dim, generator=g),
             "prompt_mask": torch.ones(1, args.prompt_tokens, dtype=torch.long),
             "id_embeds": torch.nn.functional.normalize(torch.randn(1, args.refs, id_dim, generator=g), dim=-1),
             "id_mask": torch.ones(1, args.refs, dtype=torch.bool),
             "ref_face_embeds": [torch.nn.functional.normalize(torch.randn(args.refs, face_dim, generator=g), dim=-1)]}
    return {k: ([x.to(device) for x in v] if isinstance(v, list) else v.to(device)) for k, v in batch.items()}


def fixed_faces(image):
    """Detector stand-in: one face in the middle of every decoded image."""
    from idglow_core.training.crop_fidelity import face_keypoints

    h, w = image.shape[:2]
    return [face_keypoints((w / 2, h / 2), min(h, w) / 3)]


def dpo_sequential_supported() -> tuple[bool, str]:
    from idglow_core.training.dpo import DPOConfig

    if "sequential" in {f.name for f in dataclasses.fields(DPOConfig)}:
        return True, ""
    return False, "this checkout's DPOConfig has no 'sequential' key (dpo.sequential is added by issue 12 point 4)"


def train_phase(meter, out, name, step, module, batch, optimizer, autocast) -> None:
    with meter.phase(out, name) as row:
        with autocast():
            res = step(module, batch, torch.Generator().manual_seed(1))
            if res.run_backward is not None:  # sequential DPO back-propagates in parts, as the trainer's loop does
                res.run_backward(lambda loss, last=True: loss.backward())
        if res.run_backward is None:
            res.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["loss"] = round(float(res.loss), 5)


@torch.no_grad()
def inference_phases(meter, out, module, batch, autocast) -> None:
    from idglow_core.training.packing import edit_inputs

    module.eval()
    t = torch.full((1,), 0.5, device=batch["latents"].device)
    kwargs = dict(**edit_inputs(batch["latents"], batch["ref_latents"], t), encoder_hidden_states=batch["prompt_embeds"],
                  encoder_hidden_states_mask=batch["prompt_mask"], return_dict=False)
    with meter.phase(out, "inference_adapter") as row, autocast():
        cond = module.adapter.condition(batch["id_embeds"], batch["id_mask"], weight=1.0)
        v = module.transformer(**kwargs, attention_kwargs={"idglow": cond})[0]
        row["finite"] = bool(torch.isfinite(v).all())
    with meter.phase(out, "inference_plain") as row, autocast():
        v = module.transformer(**kwargs)[0]
        row["finite"] = bool(torch.isfinite(v).all())


def run(args) -> dict:
    import tempfile

    from idglow_core.training.dpo import DPOConfig, DPOStep
    from idglow_core.training.identity import IdentityLoss, tiny_arcface
    from idglow_core.training.models import build_train_module
    from idglow_core.training.sft import SFTStep, vae_decoder

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    meter = Meter(device)
    out: dict = {}
    with meter.phase(out, "build") as row:
        dit, vae = build_models(args, device, dtype)
        cfg = train_config(args, tempfile.mkdtemp(prefix="idglow_real_scale_"))
        module = build_train_module(cfg, SimpleNamespace(transformer=dit, vae=vae, text_encoder=None), id_dim=512)
        module.to(device)
        row["dit_params_b"] = round(sum(p.numel() for n, p in dit.named_parameters() if "lora_" not in n) / 1e9, 4)
        row["trainable_params_m"] = round(sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6, 2)
    arcface = tiny_arcface().to(device)
    identity = IdentityLoss(fixed_faces, arcface)
    decode = vae_decoder(vae)
    batch = make_batch(args, vae.config.z_dim, vae.spatial_compression_ratio, 512, 32, device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    use_autocast = dtype == torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext
    module.train()
    sft = SFTStep(cfg.loss, decode, identity, vae_decoder(vae, tiled=True) if args.id_decode == "crop" else None)
    train_phase(meter, out, "sft", sft, module, batch, optimizer, autocast)
    out["sft"]["id_loss_ran"] = sft.counts["id_loss_ran"]
    train_phase(meter, out, "dpo_joint", DPOStep(cfg.loss, DPOConfig()), module, batch, optimizer, autocast)
    supported, reason = dpo_sequential_supported()
    if supported:
        step = DPOStep(cfg.loss, DPOConfig(sequential=True))
        train_phase(meter, out, "dpo_sequential", step, module, batch, optimizer, autocast)
    else:
        out["dpo_sequential"] = {"skipped": reason}
        print(f"dpo_sequential skipped: {reason}", file=sys.stderr)
    inference_phases(meter, out, module, batch, autocast)
    return {"config": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                       "width": args.heads * args.head_dim, "joint_dim": args.joint_dim, "vae": args.vae,
                       "resolution": args.resolution, "refs": args.refs, "prompt_tokens": args.prompt_tokens,
                       "lora_rank": args.lora_rank, "id_decode": args.id_decode,
                       "gradient_checkpointing": bool(args.gradient_checkpointing), "dtype": args.dtype,
                       "device": str(device)},
            "phases": out, "torch": torch.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
