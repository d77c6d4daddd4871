"""Build SFT data for IdGlow from a photo collection: build -> review by a person -> apply.

    # 1. detect and embed every face, cluster identities, write train.jsonl / val.jsonl and review.html
    python train/make_sft_data.py build --photos my_photos/ --out data/sft --backend insightface \\
        --model-dir models/insightface [--val-fraction 0.1] [--allow-self-refs] [--vlm models/Qwen2.5-VL-7B]
    # 2. open data/sft/review.html: merge / split / reject clusters and rows, "Download decisions"
    # 3. apply the decisions (rewrites train.jsonl, val.jsonl, rows.jsonl, report.json)
    python train/make_sft_data.py apply --out data/sft --decisions ~/Downloads/decisions.json
    # 4. train: data.manifest = data/sft/train.jsonl (train/configs/sft_*.yaml)

A row's target is a photo with 2-4 faces; its references are portraits of the same people cut from *other*
photos (``--allow-self-refs`` lets an identity seen only in the target use its own face; such rows say
``self_ref: true``). report.json counts every photo that gave no row, by reason. Identities are clusters at the
backend's same-person cosine (dlib 0.92, insightface 0.40; ``--threshold`` overrides; see
idglow_core/sftdata/cluster.py for the measurements).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idglow_core.cli._common import add_face_arguments, analyzer_from_args  # noqa: E402
from idglow_core.errors import IdGlowError  # noqa: E402


def cmd_build(args: argparse.Namespace) -> int:
    from idglow_core.sftdata import SftDataConfig, build_sft_data

    config = SftDataConfig(min_faces=args.min_faces, max_faces=args.max_faces, allow_self_refs=args.allow_self_refs,
                           val_fraction=args.val_fraction, seed=args.seed, threshold=args.threshold,
                           dup_hamming=args.dup_hamming, min_face_px=args.min_face_px)
    vlm = None
    if args.vlm:
        from idglow_core.prompting.vlm import load_vlm
        vlm = load_vlm(args.vlm, device=args.device)
    report = build_sft_data(args.photos, args.out, analyzer_from_args(args), config, vlm=vlm)
    print(json.dumps({k: report[k] for k in ("rows", "train", "val", "self_ref_rows", "identities", "skipped")}))
    print(f"review page: {Path(args.out) / 'review.html'}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from idglow_core.sftdata import apply_review

    vlm = None
    if args.vlm:
        from idglow_core.prompting.vlm import load_vlm
        vlm = load_vlm(args.vlm, device=args.device)
    report = apply_review(args.out, args.decisions, vlm=vlm)
    print(json.dumps({k: report[k] for k in ("rows", "train", "val", "self_ref_rows", "identities", "skipped",
                                             "review")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_sft_data.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="scan photos, cluster identities, write the rows and the review page")
    b.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--min-faces", type=int, default=2, help="fewest faces in a target photo")
    b.add_argument("--max-faces", type=int, default=4, help="most faces in a target photo")
    b.add_argument("--allow-self-refs", action="store_true",
                   help="let an identity with no other portrait use its face in the target (rows marked self_ref)")
    b.add_argument("--val-fraction", type=float, default=0.1, help="share of rows for validation (split by identity)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    b.add_argument("--threshold", type=float, default=None, help="same-person cosine (default: the backend's)")
    b.add_argument("--dup-hamming", type=int, default=4, help="difference-hash distance of near-duplicate photos")
    b.add_argument("--min-face-px", type=int, default=40, help="ignore faces narrower than this")
    b.add_argument("--vlm", default=None, help="prompt-enricher VLM folder (default: the static template)")
    b.add_argument("--device", default="cpu", help="device of the VLM")
    add_face_arguments(b)
    a = sub.add_parser("apply", help="apply the review page's decisions.json to a build")
    a.add_argument("--out", required=True, help="the build's output folder")
    a.add_argument("--decisions", required=True, help="decisions.json downloaded from review.html")
    a.add_argument("--vlm", default=None, help="enricher for rows whose references changed (else static)")
    a.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"build": cmd_build, "apply": cmd_apply}[args.command](args)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
