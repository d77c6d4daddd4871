"""``python -m idglow_core evaluate --manifest M.jsonl --out DIR [--aesthetic-dir DIR]``"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_face_arguments, analyzer_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="JSONL: refs, image, prompt, task, prompt_mode, method")
    parser.add_argument("--out", required=True, help="output folder for results.jsonl and summary.md")
    parser.add_argument("--aesthetic-dir", default=None,
                        help="folder with sac+logos+ava1-l14-linearMSE.pth and a CLIP ViT-L/14 folder; "
                             "without it the Aes columns are left out")
    parser.add_argument("--device", default="cpu", help="device for the aesthetic model")
    add_face_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_manifest, format_tables, read_manifest

    read_manifest(args.manifest)  # fail fast on a bad manifest, before any model loads
    scorer = None
    if args.aesthetic_dir:
        from ..aesthetic import AestheticScorer
        scorer = AestheticScorer.from_dir(args.aesthetic_dir, device=args.device)
    summary = evaluate_manifest(args.manifest, args.out, analyzer_from_args(args), aesthetic=scorer)
    print(format_tables(summary))
    print(f"results: {Path(args.out) / 'results.jsonl'}  summary: {Path(args.out) / 'summary.md'}")
    return 0
