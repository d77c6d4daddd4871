"""``python -m idglow_core facesim --refs A.jpg B.jpg --image G.jpg [--json]``"""
from __future__ import annotations

import argparse
import json

from ..faces.base import pick_face
from ..facesim import match_identities
from ..images import load_image
from ._common import add_face_arguments, analyzer_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refs", nargs="+", required=True, help="reference portraits, one per identity, in order")
    parser.add_argument("--image", required=True, help="the generated (group) image to score")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    add_face_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    analyzer = analyzer_from_args(args)
    refs = [pick_face(analyzer.analyze(load_image(p)), label=f"reference image {i + 1} of {len(args.refs)} ('{p}')")
            for i, p in enumerate(args.refs)]
    faces = analyzer.analyze(load_image(args.image))
    ref = np.stack([f.embedding for f in refs])
    gen = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, ref.shape[1]))
    result = match_identities(ref, gen)
    out = {"faces": [[round(float(v), 1) for v in f.bbox] for f in faces], **result.to_dict()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"backend: {analyzer.name}; {len(faces)} face(s) found, left to right:")
    for i, box in enumerate(out["faces"]):
        print(f"  face {i}: box {box}")
    for j, (a, s) in enumerate(zip(out["assignment"], out["similarity"])):
        target = f"face {a}" if a >= 0 else "no face (counts 0)"
        print(f"  reference {j + 1} ({args.refs[j]}) -> {target}, similarity {s:.4f}")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"facesim_strict {fmt(out['facesim_strict'])}  facesim_matched {fmt(out['facesim_matched'])}  "
          f"count_ok {out['count_ok']}  confusion {fmt(out['confusion'])}  ID-Conf {fmt(out['id_conf_mean'])}")
    return 0
