"""Options shared by the commands that need a face backend."""
from __future__ import annotations

import argparse


def add_face_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("face backend")
    g.add_argument("--backend", choices=["auto", "dlib", "insightface"], default="auto",
                   help="auto = insightface when --model-dir (or IDGLOW_INSIGHTFACE_DIR) holds buffalo_l, else dlib")
    g.add_argument("--model-dir", default=None,
                   help="folder with det_10g.onnx and w600k_r50.onnx (insightface buffalo_l)")
    g.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider (insightface)")
    g.add_argument("--det-size", type=int, default=640, help="detection size in px (insightface)")
    g.add_argument("--det-thresh", type=float, default=None, help="detection score threshold (backend default if unset)")


def analyzer_from_args(args: argparse.Namespace):
    from ..faces import load_analyzer

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    kwargs = {"backend": args.backend, "model_dir": args.model_dir, "providers": providers, "det_size": args.det_size}
    if args.det_thresh is not None:
        kwargs["det_thresh"] = args.det_thresh
    return load_analyzer(**kwargs)
