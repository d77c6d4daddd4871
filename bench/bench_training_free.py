"""Cost of identity without an adapter on the tiny Qwen-Image-Edit stack. Prints JSON.

``search``: full best-of-N (N candidates to the end, final images ranked) vs seed search pruned at the step
``k = steps // 2`` (t_p = that step's sigma; N candidates to step k, decode + score their estimates, finish M).
Both through ``IdGlowPipeline`` (candidates batched in one pipeline call, true CFG on). Reported: DiT
sample-steps counted by a forward hook (rows per call / 2 for CFG), the step-accounting ratio
``(N k + M (steps - k)) / (N steps)``, median wall times and their ratio, and the seconds spent decoding and
scoring the estimates, and the time inside the denoising loops (sum of the per-step log). Goal (issue 11): pruned best-of-8 keep 2 at half the steps <= 0.65x of full.

``guided_step``: one denoising step with and without identity guidance at Omega = 1 (decode of the estimate
for detection, face-window decode with gradient, tiny ArcFace, backward to the estimate), each in its own
process so peak memory is its own: max RSS growth over the post-setup baseline on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. The detector is a stub with one fixed face (a random tiny model
draws none), the ArcFace the tiny random stand-in.

    python bench/bench_training_free.py --size 64 --reps 2    # CPU, ~2 min
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
    p.add_argument("--probe", choices=["unguided", "guided"], help=argparse.SUPPRESS)
    return p.parse_args()


def _setup(args):
    from idglow_core.pipeline import IdGlowPipeline
    from idglow_core.testing import OneFaceAnalyzer, small_edit_images, tiny_edit_pipeline
    from idglow_core.training.identity import tiny_arcface

    global _SMALL
    _SMALL = small_edit_images()   # kept referenced: a collected context manager would restore ~1 MP references
    _SMALL.__enter__()
    pipe = tiny_edit_pipeline().to(args.device)
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]
    return IdGlowPipeline(pipe, None, OneFaceAnalyzer(), arcface=tiny_arcface().to(args.device)), refs


class Rows:
    def __init__(self, transformer):
        self.rows = 0
        transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, a, kw):
        self.rows += kw["hidden_states"].shape[0]


def bench_search(args) -> dict:
    from idglow_core.pipeline import GenerateConfig

    ip, refs = _setup(args)
    rows = Rows(ip.pipe.transformer)
    base = dict(steps=args.steps, height=args.size, width=args.size, output_type="pt", negative_prompt=" ",
                candidates=args.candidates, keep=args.keep)
    probe = ip(refs, GenerateConfig(seed=0, **base))                       # warm-up; gives the sigmas
    k = args.steps // 2
    ts = [e["t"] for e in probe.metadata["training_free"]["steps_log"]]
    prune_at = (ts[k - 2] + ts[k - 1]) / 2 if k >= 2 else ts[0]     # the first sigma below it is step k's
    out = {}
    for name, extra in (("full", {}), ("pruned", {"prune_at": prune_at})):
        times, scores, stepping = [], [], []
        for rep in range(args.reps):
            rows.rows = 0
            start = time.perf_counter()
            result = ip(refs, GenerateConfig(seed=rep, **base, **extra))
            times.append(time.perf_counter() - start)
            scores.append(result.metadata["training_free"].get("score_seconds", 0.0))
            stepping.append(sum(e["seconds"] for e in result.metadata["training_free"]["steps_log"]))
        meta = result.metadata["training_free"]
        out[name] = {"wall_s_median": round(statistics.median(times), 4), "wall_s": [round(t, 4) for t in times],
                     "dit_sample_steps": rows.rows // 2, "accounting": meta["accounting"],
                     "decode_score_s_median": round(statistics.median(scores), 4),
                     "denoising_s_median": round(statistics.median(stepping), 4)}
    out["split_step"], out["prune_at"] = k, round(prune_at, 5)
    out["accounting_ratio"] = out["pruned"]["accounting"]["ratio"]
    out["wall_ratio"] = round(out["pruned"]["wall_s_median"] / out["full"]["wall_s_median"], 4)
    out["decode_score_share_of_pruned"] = round(out["pruned"]["decode_score_s_median"]
                                                / out["pruned"]["wall_s_median"], 4)
    out["denoising_ratio"] = round(out["pruned"]["denoising_s_median"] / out["full"]["denoising_s_median"], 4)
    out["goal_wall_ratio_le_0.65"] = out["wall_ratio"] <= 0.65
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
              "keep": args.keep, "threads": args.threads, "search": bench_search(args)}
    steps = {}
    for probe in ("unguided", "guided"):
        cmd = [sys.executable, __file__, "--probe", probe, "--device", args.device, "--size", str(args.size),
               "--threads", str(args.threads)]
        steps[probe] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    steps["guided_over_unguided_time"] = round(steps["guided"]["step_s_median"] / steps["unguided"]["step_s_median"], 3)
    report["guided_step"] = steps
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
