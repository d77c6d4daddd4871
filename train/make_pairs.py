"""Build DPO preference pairs for IdGlow (paper §3.4, Eq. 8-9): build -> review by a person -> apply.

    # 1. candidates (anchors, generations, perturbations) -> scores (cached) -> proposed pairs -> Eq. 9 filter
    python train/make_pairs.py build --groups groups.jsonl --out runs/pairs \
        --config train/configs/pairs_default.yaml --set thresholds.id=0.08 \
        --clip-dir models/clip-vit-large-patch14 --aesthetic-dir models/aesthetic \
        --model models/Qwen-Image-Edit-2511 --adapter idglow.safetensors --backend insightface
    # 2. a static page to accept / reject every kept pair ("Download decisions" saves decisions.json)
    python train/make_pairs.py review --pairs runs/pairs/pairs.jsonl --out runs/pairs/review.html
    # 3. the DPO manifest of the accepted pairs
    python train/make_pairs.py apply --pairs runs/pairs/pairs.jsonl --decisions decisions.json \
        --out runs/pairs/dpo.jsonl

groups.jsonl: one ``{"refs": [...], "prompt": ..., "task": ..., "anchors": [...], "generated": [...]}`` per
line (see idglow_core/preference/groups.py). Generations come from IdGlowPipeline (``--model`` + ``--adapter``,
one per configured seed), or from ``--generator FILE.py:NAME`` / ``package.module:NAME``, any callable
``generate(refs, prompt, seed) -> image`` (refs: k RGB uint8 arrays); with neither, only anchors, listed
generations and perturbations are used. Rerunning ``build``
re-scores nothing that is already in ``<out>/scores_cache.json`` and regenerates no existing image.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idglow_core.cli._common import add_face_arguments, analyzer_from_args  # noqa: E402
from idglow_core.errors import IdGlowError, InputError  # noqa: E402


def load_generator(spec: str):
    """``path/to/file.py:name`` or ``package.module:name`` -> the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InputError(f"--generator '{spec}' must look like my_generate.py:generate or package.module:generate.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"--generator file '{path}' does not exist.")
        mod_spec = importlib.util.spec_from_file_location(f"_idglow_generator_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"--generator: cannot import module '{target}' ({exc}).") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--generator: '{name}' in '{target}' is missing or not callable. It must be "
                         f"generate(refs, prompt, seed) -> image.")
    return fn


def pipeline_from_args(args: argparse.Namespace):
    """The IdGlowPipeline generator for ``--model`` + ``--adapter``, or None when neither is given."""
    if not args.model and not args.adapter:
        return None
    if not (args.model and args.adapter):
        raise InputError("--model and --adapter go together: the base Qwen-Image-Edit pipeline and the IdGlow adapter.")
    from idglow_core.pipeline import GenerateConfig, IdGlowPipeline
    from idglow_core.preference import pipeline_generator

    pipe = IdGlowPipeline.from_pretrained(args.model, args.adapter, device=args.device, face_backend=args.backend,
                                          face_model_dir=args.model_dir)
    return pipeline_generator(pipe, GenerateConfig(steps=args.steps, height=args.height, width=args.width,
                                                   weight=args.weight))


def cmd_build(args: argparse.Namespace) -> int:
    from idglow_core.preference import ClipEncoder, MetricSuite, build_pairs, load_pairs_config, read_groups

    config = load_pairs_config(args.config, args.set)
    read_groups(args.groups)  # fail fast on a bad groups file, before any model loads
    if args.generator and (args.model or args.adapter):
        raise InputError("Give either --generator or --model/--adapter (IdGlowPipeline), not both.")
    generate = load_generator(args.generator) if args.generator else pipeline_from_args(args)
    aesthetic = clip = None
    if args.aesthetic_dir:
        from idglow_core.aesthetic import AestheticScorer
        aesthetic = AestheticScorer.from_dir(args.aesthetic_dir, device=args.device)
    if args.clip_dir:
        clip = ClipEncoder.from_dir(args.clip_dir, device=args.device)
    suite = MetricSuite(analyzer_from_args(args), aesthetic=aesthetic, clip=clip, obj_context=config.obj_context)
    r = build_pairs(args.groups, args.out, suite, config, generate=generate, progress=not args.quiet)
    print(f"{r.groups} groups, {r.candidates} candidates ({r.generated} generated; {r.scored} scored, "
          f"{r.cached} from cache), {r.proposed} pairs proposed, {r.kept} kept -> {Path(args.out) / 'pairs.jsonl'}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from idglow_core.preference import write_review_page

    print(f"review page: {write_review_page(args.pairs, args.out)}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from idglow_core.preference import apply_decisions

    n = apply_decisions(args.pairs, args.decisions, args.out, require_all=args.require_all)
    print(f"{n} accepted pairs -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_pairs.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="make candidates, score them, propose and filter pairs (Eq. 8-9)")
    b.add_argument("--groups", required=True, help="JSONL of groups: refs, prompt, task, anchors, generated")
    b.add_argument("--out", required=True, help="output folder (images, scores cache, pairs.jsonl)")
    b.add_argument("--config", default=None, help="pairs YAML (train/configs/pairs_default.yaml); defaults if unset")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. thresholds.id=0.08 or seeds=[0,1] (repeatable)")
    b.add_argument("--generator", default=None, help="FILE.py:NAME or module:NAME, generate(refs, prompt, seed)")
    g = b.add_argument_group("generation with IdGlowPipeline (instead of --generator)")
    g.add_argument("--model", default=None, help="base Qwen-Image-Edit-2511 folder (or cached HF id)")
    g.add_argument("--adapter", default=None, help="IdGlow adapter .safetensors")
    g.add_argument("--steps", type=int, default=40, help="sampling steps per generation")
    g.add_argument("--height", type=int, default=None, help="output height (default: the pipeline's choice)")
    g.add_argument("--width", type=int, default=None, help="output width (default: the pipeline's choice)")
    g.add_argument("--weight", type=float, default=1.0, help="identity injection weight")
    b.add_argument("--clip-dir", default=None, help="CLIP folder (HF format) for phi_sem and phi_obj; off if unset")
    b.add_argument("--aesthetic-dir", default=None, help="aesthetic head + CLIP ViT-L/14 folder; phi_aes off if unset")
    b.add_argument("--device", default="cpu", help="device for the CLIP and aesthetic models")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    add_face_arguments(b)
    r = sub.add_parser("review", help="write the static HTML review page for pairs.jsonl")
    r.add_argument("--pairs", required=True, help="pairs.jsonl written by build")
    r.add_argument("--out", required=True, help="HTML file to write (images are linked relative to it)")
    a = sub.add_parser("apply", help="keep the accepted pairs: write the DPO manifest")
    a.add_argument("--pairs", required=True, help="pairs.jsonl written by build")
    a.add_argument("--decisions", required=True, help="decisions.json from the review page, or CSV pair_id,decision")
    a.add_argument("--out", required=True, help="DPO manifest (JSONL) to write")
    a.add_argument("--require-all", action="store_true", help="fail if any pair has no decision")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"build": cmd_build, "review": cmd_review, "apply": cmd_apply}[args.command](args)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
