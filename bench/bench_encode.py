"""Host memory of the training data path as the dataset grows (issue 12, point 8). Prints JSON.

Each (mode, n) runs in its own process, so its peak RSS is its own. The samples are synthetic at real scale:
one 1024 px target and 3 references as 16 x 128 x 128 latents, and ``--tokens`` x 3584 prompt embeddings (the
Qwen2.5-VL-7B width; 800 tokens ~ 3 references at 384^2 plus a prompt): about 15 MB per sample in fp32. Only
the encoder is fake (random tensors instead of the VAE and the 7 B text encoder); caching, sharding and loading
are the library's (``encode.SampleEncoder.ensure`` / ``load``, ``encode_sharded``, ``LazyEncodings``).

- ``lazy`` (what the trainers do now): encode into the disk cache (bf16 files), then read every sample twice
  (two epochs) through ``LazyEncodings`` + ``collate``, as the loop does, batch size 1.
- ``in_memory`` (what they did before): keep every encoding in a list, then the same two epochs.

Goal: peak RSS of ``lazy`` at n = 64 within 10 % of n = 8.

    python bench/bench_encode.py                      # ~1 min on 2 CPU cores, writes to a temp folder
    python bench/bench_encode.py --sizes 8 64 512 --cache-dir /scratch/enc
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tokens", type=int, default=800, help="prompt embedding length per sample")
    p.add_argument("--cache-dir", default="", help="where the encodings go (default: a temp folder, removed)")
    p.add_argument("--run", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    return p.parse_args()


def _samples(folder: Path, n: int):
    """n samples whose files differ (the cache key hashes the files): tiny images, 3 fake reference faces."""
    from PIL import Image

    from idglow_core.faces.base import Face
    from idglow_core.training.data import Sample

    rng = np.random.default_rng(0)
    kps = np.zeros((5, 2), np.float32)
    out = []
    for i in range(n):
        paths = []
        for j in range(4):
            path = folder / f"img_{i}_{j}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        faces = [Face(np.zeros(4, np.float32), kps, 1.0, rng.normal(size=512).astype(np.float32)) for _ in range(3)]
        out.append(Sample(line=i + 1, target=paths[0], refs=paths[1:], prompt=f"sample {i}", task="group",
                          ref_faces=faces))
    return out


def _encoder(cache: Path, tokens: int):
    from idglow_core.training.encode import SampleEncoder

    class RealScaleEncoder(SampleEncoder):
        """The library's encoder with random real-size tensors in place of the VAE and the text encoder."""

        def _encode(self, s):
            g = torch.Generator().manual_seed(s.line)
            lat = lambda: torch.randn(16, 1, 128, 128, generator=g)  # noqa: E731 - 1024 px at x8
            out = {"latents": lat(), "prompt_embeds": torch.randn(tokens, 3584, generator=g),
                   "prompt_mask": torch.ones(tokens, dtype=torch.long)}
            out.update({f"ref_latents.{j}": lat() for j in range(len(s.refs))})
            return out

    return RealScaleEncoder(pipe=None, identity=None, resolution=1024, cache_dir=cache, model_tag="bench",
                            areas=(384 * 384, 1024 * 1024))


def run_one(mode: str, n: int, tokens: int, cache_root: Path) -> dict:
    from idglow_core.training.encode import LazyEncodings, collate, encode_sharded

    data = cache_root / f"data_{n}"
    data.mkdir(parents=True, exist_ok=True)
    samples = _samples(data, n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "lazy":
        encoder = _encoder(cache_root / f"cache_{n}", tokens)
        encode_sharded(samples, encoder.ensure)
        dataset = LazyEncodings(samples, encoder.load)
    else:
        encoder = _encoder(None, tokens)
        dataset = [encoder(i, s) for i, s in enumerate(samples)]
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    checksum = 0.0
    for _epoch in range(2):
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            checksum += float(batch["latents"][0, 0, 0, 0, 0])
    t_epochs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"mode": mode, "n": n, "peak_rss_mb": round(peak / 2**20, 1),
            "growth_over_setup_mb": round((peak - base) / 2**20, 1), "encode_s": round(t_encode, 2),
            "two_epochs_s": round(t_epochs, 2), "checksum": round(checksum, 4)}


def main() -> None:
    args = parse_args()
    if args.run:
        print(json.dumps(run_one(args.run[0], int(args.run[1]), args.tokens, Path(args.cache_dir))))
        return
    root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="idglow_bench_encode_"))
    rows = []
    try:
        for mode in ("lazy", "in_memory"):
            for n in args.sizes:
                cmd = [sys.executable, __file__, "--run", mode, str(n), "--tokens", str(args.tokens),
                       "--cache-dir", str(root)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if not args.cache_dir:
            shutil.rmtree(root, ignore_errors=True)
    peak = {(r["mode"], r["n"]): r["peak_rss_mb"] for r in rows}
    lo, hi = min(args.sizes), max(args.sizes)
    ratios = {mode: round(peak[(mode, hi)] / peak[(mode, lo)], 3) for mode in ("lazy", "in_memory")}
    print(json.dumps({"rows": rows, "peak_ratio": {f"{m}_{hi}_over_{lo}": v for m, v in ratios.items()},
                      "goal": f"lazy peak RSS at n={hi} within 10% of n={lo}",
                      "goal_met": ratios["lazy"] <= 1.10, "tokens": args.tokens,
                      "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
