"""``python -m idglow_core evaluate --manifest M.jsonl --out DIR [--aesthetic-dir DIR] [--workers N] [--overwrite]``

Rerunning the same command into the same ``--out`` resumes (finished rows are kept); a different manifest or
backend is refused there unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ._common import add_face_arguments, analyzer_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="JSONL: refs, image, prompt, task, prompt_mode, method")
    parser.add_argument("--out", required=True, help="output folder for results.jsonl and summary.md")
    parser.add_argument("--aesthetic-dir", default=None,
                        help="folder with sac+logos+ava1-l14-linearMSE.pth and a CLIP ViT-L/14 folder; "
                             "without it the Aes columns are left out")
    parser.add_argument("--device", default="cpu", help="device for the aesthetic model")
    parser.add_argument("--workers", type=int, default=1,
                        help="face-analysis processes for a CPU backend (dlib uses one core per image); each "
                             "distinct image is analysed once whatever the count")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results in --out computed from another manifest or with other settings "
                             "(without it a rerun resumes, or is refused when they differ)")
    add_face_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..eval_store import ResultStore, check_output_dir, manifest_sha256
    from ..evaluate import evaluate_manifest, format_tables, read_manifest

    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}.")
    if args.workers > 1 and args.provider == "cuda":
        raise InputError("--workers applies to CPU face backends; with --provider cuda use --workers 1 (one GPU "
                         "session already takes the whole image batch).")
    # fail fast, before any model loads: a writable output folder, a sound manifest, no results of another one
    check_output_dir(args.out)
    read_manifest(args.manifest)
    ResultStore.prepare(args.out, {"manifest_sha256": manifest_sha256(args.manifest)}, args.overwrite,
                        keys=("manifest_sha256",))
    scorer = None
    if args.aesthetic_dir:
        from ..aesthetic import AestheticScorer
        scorer = AestheticScorer.from_dir(args.aesthetic_dir, device=args.device)
    summary = evaluate_manifest(args.manifest, args.out, analyzer_from_args(args), aesthetic=scorer,
                                overwrite=args.overwrite, workers=args.workers)
    print(format_tables(summary))
    print(f"results: {Path(args.out) / 'results.jsonl'}  summary: {Path(args.out) / 'summary.md'}")
    return 0
