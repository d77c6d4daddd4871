"""Face pipeline and batch-evaluation throughput, printed as JSON.

For each available backend: faces/s for detect+align+embed over 100 generated composites (2-3 people each,
random order, built from the public-domain test photos), and samples/s for ``evaluate_manifest`` on the same
100 samples (references embedded once per distinct file, each image detected once).

``dedup`` (dlib): manifests of ``--lines`` lines naming only D distinct images (D from ``--distinct``):
evaluation time follows D, not the line count (``analyze_calls`` counts detector runs). ``workers``: the
100-sample evaluation with ``--workers`` processes against one. ``large_image`` (dlib): one ``--large-mp``
photo (a composite upscaled) analysed at the detection working size, then at full size (``detect_max_side``
unlimited, the old behaviour): seconds, faces and the process's peak RSS after each (0 = skip).

    python bench/bench_faces.py [--n 100] [--lines 200] [--distinct 4,20] [--workers 2]
                                [--insightface-dir DIR] [--provider cpu|cuda]

The insightface backend is measured only when a buffalo_l folder is given (no weights ship with any package).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from idglow_core.evaluate import evaluate_manifest  # noqa: E402
from idglow_core.faces import load_analyzer  # noqa: E402
from idglow_core.images import load_image  # noqa: E402

DATA = ROOT / "tests" / "data"
PEOPLE = {"obama": ["obama2", "obama3"], "biden": ["biden"], "astronaut": ["astronaut"]}


def build_set(folder: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        who = rng.sample(sorted(PEOPLE), rng.choice([2, 3]))
        parts = []
        for person in who:
            img = Image.open(DATA / f"{rng.choice(PEOPLE[person])}.jpg").convert("RGB")
            parts.append(ImageOps.mirror(img) if person != "obama" else img)
        canvas = Image.new("RGB", (sum(p.width for p in parts), 400), (235, 235, 235))
        x = 0
        for p in parts:
            canvas.paste(p, (x, 0))
            x += p.width
        canvas.save(folder / f"{i:03d}.jpg", quality=90)
        refs = [str(DATA / f"{p}.jpg") for p in rng.sample(who, len(who))]
        lines.append(json.dumps({"refs": refs, "image": f"{i:03d}.jpg", "task": "group", "method": "bench"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def bench_backend(analyzer, manifest: Path, out: Path) -> dict:
    images = [load_image(p) for p in sorted(manifest.parent.glob("*.jpg"))]
    analyzer.analyze(images[0])  # warm-up (model load, first-call allocations)
    t0 = time.perf_counter()
    faces = sum(len(analyzer.analyze(img)) for img in images)
    t_detect = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = evaluate_manifest(manifest, out, analyzer, progress=False)
    t_eval = time.perf_counter() - t0
    cell = summary["group"]["bench"]["static"]
    return {"backend": analyzer.name, "images": len(images), "faces_found": faces,
            "faces_per_s": round(faces / t_detect, 2), "images_per_s": round(len(images) / t_detect, 2),
            "evaluate_samples_per_s": round(cell["n"] / t_eval, 2), "evaluate_s": round(t_eval, 2),
            "facesim_strict_mean": round(cell["fs"], 4), "count_ok": round(cell["count_ok"], 3)}


class CountingAnalyzer:
    """Counts ``analyze`` calls of the wrapped analyzer (one process)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.embedding_dim = inner.name, inner.embedding_dim

    def analyze(self, image):
        self.calls += 1
        return self.inner.analyze(image)


def bench_dedup(analyzer, manifest: Path, lines: int, distinct: int, out: Path) -> dict:
    """Evaluate ``lines`` lines cycling over the first ``distinct`` lines of ``manifest``."""
    src = manifest.read_text().splitlines()[:distinct]
    dup = manifest.with_name(f"dedup_{lines}_{distinct}.jsonl")
    dup.write_text("\n".join(src[i % distinct] for i in range(lines)) + "\n")
    counting = CountingAnalyzer(analyzer)
    t0 = time.perf_counter()
    summary = evaluate_manifest(dup, out, counting, progress=False)
    dt = time.perf_counter() - t0
    refs = len({r for line in src for r in json.loads(line)["refs"]})
    return {"lines": lines, "distinct_images": distinct, "distinct_refs": refs, "analyze_calls": counting.calls,
            "evaluate_s": round(dt, 2), "samples_per_s": round(summary["group"]["bench"]["static"]["n"] / dt, 2)}


def bench_workers(analyzer, manifest: Path, workers: int, out: Path) -> dict:
    times = {}
    for w in (1, workers):
        t0 = time.perf_counter()
        evaluate_manifest(manifest, out / f"w{w}", analyzer, progress=False, workers=w)
        times[w] = time.perf_counter() - t0
    n = len(manifest.read_text().splitlines())
    return {"samples": n, "workers": workers, "cpu_cores": os.cpu_count(),
            "samples_per_s_1": round(n / times[1], 2), f"samples_per_s_{workers}": round(n / times[workers], 2),
            "speedup": round(times[1] / times[workers], 2), "note": "includes starting the worker processes"}


def bench_large(manifest: Path, megapixels: float) -> dict:
    import resource

    import numpy as np

    from idglow_core.faces.dlib_backend import DlibAnalyzer

    img = Image.open(sorted(manifest.parent.glob("*.jpg"))[0]).convert("RGB")
    scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
    big = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC))
    out = {"size": [int(big.shape[1]), int(big.shape[0])], "megapixels": round(big.shape[0] * big.shape[1] / 1e6, 1)}
    for label, side in (("working_size", None), ("full_size", 10 ** 9)):
        analyzer = DlibAnalyzer() if side is None else DlibAnalyzer(detect_max_side=side)
        t0 = time.perf_counter()
        faces = analyzer.analyze(big)
        out[label] = {"detect_max_side": analyzer.detect_max_side, "s": round(time.perf_counter() - t0, 2),
                      "faces": len(faces),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--insightface-dir", default=None)
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--lines", type=int, default=200, help="manifest lines of the dedup runs")
    ap.add_argument("--distinct", default="4,20", help="distinct images of the dedup runs (comma-separated)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes to compare with 1 (0 = skip)")
    ap.add_argument("--large-mp", type=float, default=24.0, help="megapixels of the large-image run (0 = skip)")
    args = ap.parse_args()
    results = {"machine": {"python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
                           "processor": platform.machine()}, "backends": [], "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_set(Path(tmp), args.n)
        dlib = load_analyzer("dlib")
        results["backends"].append(bench_backend(dlib, manifest, Path(tmp) / "out_dlib"))
        results["dedup"] = [bench_dedup(dlib, manifest, args.lines, int(d), Path(tmp) / f"out_dedup_{d}")
                            for d in args.distinct.split(",")]
        if args.large_mp > 0:
            results["large_image"] = bench_large(manifest, args.large_mp)
        if args.workers > 1:
            results["workers"] = bench_workers(dlib, manifest, args.workers, Path(tmp) / "out_workers")
        if args.insightface_dir:
            providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if args.provider == "cuda"
                         else ["CPUExecutionProvider"])
            analyzer = load_analyzer("insightface", model_dir=args.insightface_dir, providers=providers)
            results["backends"].append(bench_backend(analyzer, manifest, Path(tmp) / "out_if"))
        else:
            results["skipped"]["insightface"] = "no --insightface-dir (buffalo_l weights ship with no package)"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
