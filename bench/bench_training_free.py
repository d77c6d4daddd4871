"""Cost of identity without an adapter on the tiny Qwen-Image-Edit stack. Prints JSON.

``search``: full best-of-N (N candidates to the end, final images ranked) vs seed search pruned at the step
``k = steps // 2`` (t_p = that step's sigma; N candidates to step k, decode + score their estimates, finish M),
through ``IdGlowPipeline`` (true CFG on) in two modes: ``batched`` (all N candidates in one pipeline call, M in
the second) and ``sequential`` (``GenerateConfig(sequential=True)``: one candidate per call, batch 1, the way the
``IdGlowSeedSearch`` node runs them; the same images). Per mode: DiT sample-steps counted by a forward hook (rows
per call / 2 for CFG), median wall times and the pruned/full ratio against the step-accounting ratio
``(N k + M (steps - k)) / (N steps)``, the seconds spent decoding + scoring (pruned: the N estimates at t_p;
full: scoring the N final images, whose decode is part of sampling) and their share of the run, and the
denoising-loop time (sum of the per-step log). Goal (issue 11): pruned best-of-8 keep 2 at half the steps
<= 0.65x of full, decode + score <= 5 %. The wall time can follow the accounting only where a batch of N costs N
times a batch of 1, i.e. in ``sequential`` mode or with a compute-bound DiT; ``--dit-heads`` widens the tiny DiT
(inner dim 16 x heads, default 3) and ``--dit-layers`` deepens it so that it, not the tiny VAE, dominates.

``guided_step``: one denoising step with and without identity guidance at Omega = 1 (decode of the estimate
for detection, face-window decode with gradient, tiny ArcFace, backward to the estimate), each in its own
process so peak memory is its own: max RSS growth over the post-setup baseline on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. The detector is a stub with one fixed face (a random tiny model
draws none), the ArcFace the tiny random stand-in.

    python bench/bench_training_free.py --size 64 --reps 2 --threads 1                 # CPU, ~3 min
    python bench/bench_training_free.py --size 64 --reps 2 --threads 1 --dit-heads 16 --dit-layers 4
    python bench/bench_training_free.py --device cuda --size 512 --reps 3
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
_SMALL = None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="output side in pixels (latent side = size / 4 tiny)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed runs of each search after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--dit-heads", type=int, default=3, help="tiny DiT width = 16 x heads (3: the test DiT)")
    p.add_argument("--dit-layers", type=int, default=2, help="tiny DiT blocks (2: the test DiT)")
    p.add_argument("--probe", choices=["unguided", "guided"], help=argparse.SUPPRESS)
    return p.parse_args()


def _setup(args):
    from idglow_core.pipeline import IdGlowPipeline
    from idglow_core.testing import OneFaceAnalyzer, small_edit_images, tiny_edit_pipeline
    from idglow_core.training.identity import tiny_arcface

    global _SMALL
    _SMALL = small_edit_images()   # kept referenced: a collected context manager would restore ~1 MP references
    _SMALL.__enter__()
    pipe = tiny_edit_pipeline(num_layers=args.dit_layers, heads=args.dit_heads).to(args.device)
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]
    return IdGlowPipeline(pipe, None, OneFaceAnalyzer(), arcface=tiny_arcface().to(args.device)), refs


class Rows:
    def __init__(self, transformer):
        self.rows = 0
        transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, a, kw):
        self.rows += kw["hidden_states"].shape[0]


def _timed(ip, refs, rows, cfg) -> dict:
    rows.rows = 0
    start = time.perf_counter()
    meta = ip(refs, cfg).metadata["training_free"]
    return {"wall": time.perf_counter() - start, "score": meta.get("score_seconds", 0.0), "rows": rows.rows,
            "stepping": sum(e["seconds"] for e in meta["steps_log"]), "accounting": meta["accounting"]}


def _mode(ip, refs, rows, args, base: dict, prune_at: float) -> dict:
    """Full and pruned search ``args.reps`` times each (seeds 0 ..), medians and ratios."""
    from idglow_core.pipeline import GenerateConfig

    out = {}
    for name, extra in (("full", {}), ("pruned", {"prune_at": prune_at})):
        runs = [_timed(ip, refs, rows, GenerateConfig(seed=rep, **base, **extra)) for rep in range(args.reps)]
        med = {key: statistics.median(r[key] for r in runs) for key in ("wall", "score", "stepping")}
        out[name] = {"wall_s_median": round(med["wall"], 4), "wall_s": [round(r["wall"], 4) for r in runs],
                     "dit_sample_steps": runs[-1]["rows"] // 2, "accounting": runs[-1]["accounting"],
                     "decode_score_s_median": round(med["score"], 4),
                     "decode_score_share": round(med["score"] / med["wall"], 4),
                     "denoising_s_median": round(med["stepping"], 4)}
    out["accounting_ratio"] = out["pruned"]["accounting"]["ratio"]
    out["wall_ratio"] = round(out["pruned"]["wall_s_median"] / out["full"]["wall_s_median"], 4)
    out["wall_over_accounting"] = round(out["wall_ratio"] / out["accounting_ratio"], 4)
    out["denoising_ratio"] = round(out["pruned"]["denoising_s_median"] / out["full"]["denoising_s_median"], 4)
    out["goal_wall_ratio_le_0.65"] = out["wall_ratio"] <= 0.65
    out["goal_decode_score_share_le_0.05"] = out["pruned"]["decode_score_share"] <= 0.05
    return out


def bench_search(args) -> dict:
    from idglow_core.pipeline import GenerateConfig

    ip, refs = _setup(args)
    rows = Rows(ip.pipe.transformer)
    base = dict(steps=args.steps, height=args.size, width=args.size, output_type="pt", negative_prompt=" ",
                candidates=args.candidates, keep=args.keep)
    probe = ip(refs, GenerateConfig(seed=0, **base))                       # warm-up; gives the sigmas
    ip(refs, GenerateConfig(seed=0, **base, sequential=True, prune_at=0.5))  # warm-up of batch-1 shapes
    k = args.steps // 2
    ts = [e["t"] for e in probe.metadata["training_free"]["steps_log"]]
    prune_at = (ts[k - 2] + ts[k - 1]) / 2 if k >= 2 else ts[0]     # the first sigma below it is step k's
    out = {"split_step": k, "prune_at": round(prune_at, 5),
           "dit_params": sum(p.numel() for p in ip.pipe.transformer.parameters()),
           "vae_params": sum(p.numel() for p in ip.pipe.vae.parameters())}
    for mode, sequential in (("batched", False), ("sequential", True)):
        out[mode] = _mode(ip, refs, rows, args, {**base, "sequential": sequential}, prune_at)
    return out


def probe_step(args) -> dict:
    """One DiT step (+ the guidance at Omega = 1 when guided); peak memory growth over the baseline."""
    from idglow_core.guidance import GuidanceConfig, IdentityGuidance, guidance_references
    from idglow_core.schedules import Schedule
    from idglow_core.training.identity import analyzer_detector
    from idglow_core.training.sft import vae_decoder

    ip, refs = _setup(args)
    pipe, dev, n = ip.pipe, args.device, args.size // 8       # packed tokens per side (x4 VAE, 2x2 patches)
    detect = analyzer_detector(ip.analyzer)
    guidance = IdentityGuidance(guidance_references(refs, detect, ip.arcface), vae_decoder(pipe.vae), detect,
                                ip.arcface, GuidanceConfig(strength=1.0), Schedule("constant"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n * n, 16, generator=g).to(dev)
    ctx = torch.randn(1, 12, 16, generator=g).to(dev)

    def step():
        with torch.no_grad():
            v = pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5], device=dev), encoder_hidden_states=ctx,
                                 encoder_hidden_states_mask=torch.ones(1, 12, device=dev), img_shapes=[[(1, n, n)]],
                                 return_dict=False)[0]
        if args.probe == "guided":
            x0 = pipe._unpack_latents(x - 0.5 * v, args.size, args.size, pipe.vae_scale_factor)
            guidance(x0, 0.5)

    step()                                                       # warm-up: allocator, lazy imports
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if dev.startswith("cuda") else \
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"step_s_median": round(statistics.median(times), 4), "peak_mib_over_baseline": round(peak, 2),
            "peak_kind": "cuda max_memory_allocated" if dev.startswith("cuda") else "max RSS growth (CPU)"}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe_step(args)))
        return 0
    report = {"device": args.device, "size": args.size, "steps": args.steps, "candidates": args.candidates,
              "keep": args.keep, "threads": args.threads, "dit_heads": args.dit_heads,
              "dit_layers": args.dit_layers, "search": bench_search(args)}
    steps = {}
    for probe in ("unguided", "guided"):
        cmd = [sys.executable, __file__, "--probe", probe, "--device", args.device, "--size", str(args.size),
               "--threads", str(args.threads), "--dit-heads", str(args.dit_heads),
               "--dit-layers", str(args.dit_layers)]
        steps[probe] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    steps["guided_over_unguided_time"] = round(steps["guided"]["step_s_median"] / steps["unguided"]["step_s_median"], 3)
    report["guided_step"] = steps
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
