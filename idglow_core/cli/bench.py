"""``python -m idglow_core bench build|run``: the paper's test set and any method run through it.

    python -m idglow_core bench build --identities portraits/ --out bench/ [--k 2 3] [--sets 50] [--seed 0]
        [--vlm QWEN_VL_DIR]                         # dynamic prompts; without it the rows are static only
    python -m idglow_core bench build --sft-manifest data/sft/val.jsonl --out bench_gt/   # with ground truth
    python -m idglow_core bench run --manifest bench/bench.jsonl --method IdGlow --model QIE_DIR \\
        [--adapter idglow.safetensors] [--pipeline-arg steps=40 ...]      # accelerate launch -> one slice per rank
    python -m idglow_core bench run --manifest bench/bench.jsonl --method "Qwen-Image-Edit (native)" \\
        --comfy-url http://127.0.0.1:8188 --workflow-map map.yaml
    python -m idglow_core evaluate --manifest bench/generated.jsonl --out bench/eval
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from ._common import add_face_arguments, analyzer_from_args

HELP = "Build the benchmark from identity portraits, or run a method (IdGlowPipeline / ComfyUI) over it."
log = logging.getLogger("idglow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="identity portraits -> bench.jsonl (k-sets shared by Task 1 and Task 2)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--identities", help="folder: one sub-folder (or one image file) per person")
    src.add_argument("--sft-manifest", help="an SFT manifest (e.g. make_sft_data.py's val.jsonl): Task 1 rows whose "
                                            "target photo is the ground truth (adds the copy-paste measure)")
    b.add_argument("--out", required=True, help="output folder (refs/, bench.jsonl, bench.json)")
    b.add_argument("--k", type=int, nargs="+", default=[2, 3], help="people per image (paper: 2 3)")
    b.add_argument("--sets", type=int, default=50, help="identity sets per k")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tasks", nargs="+", default=["group", "age"], choices=["group", "age"])
    b.add_argument("--vlm", default=None, help="prompt-enricher VLM folder for the dynamic prompts")
    b.add_argument("--vlm-lora", default=None, help="aligned enricher LoRA folder (train/prompt_dpo.py)")
    b.add_argument("--device", default="cpu", help="device of the VLM")
    b.add_argument("--check-faces", action="store_true", help="skip identities whose portraits hold no face")
    add_face_arguments(b)
    r = sub.add_parser("run", help="generate every row with one method; resumable; sharded under accelerate")
    r.add_argument("--manifest", required=True, help="bench.jsonl written by `bench build`")
    r.add_argument("--method", required=True, help="the method's name (its row in the tables)")
    r.add_argument("--model", default=None, help="Qwen-Image-Edit-2511 folder (IdGlowPipeline method)")
    r.add_argument("--adapter", default=None, help="IdGlow adapter; without it the base pipeline runs")
    r.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a GenerateConfig option, e.g. steps=20 or schedule='gate(lo=0.3,hi=0.6)'; repeatable")
    r.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    r.add_argument("--face-backend", default="auto", choices=["auto", "insightface", "dlib"])
    r.add_argument("--face-model-dir", default=None)
    r.add_argument("--comfy-url", default=None, help="a running ComfyUI server (ComfyUI method)")
    r.add_argument("--workflow-map", default=None, help="mapping file: workflow, refs, prompt, seed, output")
    r.add_argument("--comfy-timeout", type=float, default=600.0, help="seconds to wait for one row")


def _build(args) -> int:
    from ..bench.build import BenchConfig, build_bench, build_bench_from_sft

    analyzer = analyzer_from_args(args) if args.check_faces else None
    vlm = None
    if args.vlm:
        from ..prompting.vlm import load_vlm
        vlm = load_vlm(args.vlm, device=args.device, lora=args.vlm_lora)
    if args.sft_manifest:
        info = build_bench_from_sft(args.sft_manifest, args.out, seed=args.seed, vlm=vlm)
    else:
        info = build_bench(args.identities, args.out, BenchConfig(ks=tuple(args.k), sets_per_k=args.sets,
                                                                  seed=args.seed, tasks=tuple(args.tasks)),
                           analyzer=analyzer, vlm=vlm)
    print(json.dumps({k: info.get(k) for k in ("rows", "prompt_modes", "dynamic", "skipped_identities")}))
    return 0


def _method(args, rank: int):
    from ..errors import InputError

    if bool(args.model) == bool(args.comfy_url):
        raise InputError("Give either --model (IdGlowPipeline) or --comfy-url with --workflow-map (ComfyUI).")
    if args.comfy_url:
        from ..bench.comfy import ComfyClient, ComfyMethod, read_mapping
        if not args.workflow_map:
            raise InputError("--comfy-url needs --workflow-map (which nodes take the references, prompt, seed).")
        return ComfyMethod(ComfyClient(args.comfy_url, timeout=args.comfy_timeout), read_mapping(args.workflow_map),
                           name=args.method)
    import torch

    from ..bench.pipeline_method import PipelineMethod, parse_pipeline_args
    options = parse_pipeline_args(args.pipeline_arg, adapter=bool(args.adapter))
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu")
    return PipelineMethod.load(args.model, args.adapter, options, device=device, face_backend=args.face_backend,
                               face_model_dir=args.face_model_dir)


def _run(args) -> int:
    from ..bench.run import read_bench, run_bench, write_manifests

    read_bench(args.manifest)  # fail fast, before a model loads
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    state = None
    if world > 1:  # under accelerate launch / torchrun
        import torch
        from accelerate import PartialState

        from ..errors import InputError
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)  # PartialState() alone ignores ACCELERATE_USE_CPU and starts no group on CPU
        if state.num_processes != world:
            raise InputError(f"WORLD_SIZE is {world} but accelerate started {state.num_processes} process group(s); "
                             f"the ranks would race over the same rows. Launch with `accelerate launch "
                             f"--multi_gpu --num_processes {world}` (on CPU also ACCELERATE_USE_CPU=true).")
        rank, world = state.process_index, state.num_processes
    result = run_bench(args.manifest, _method(args, rank), args.method, rank=rank, world=world)
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        manifest, n = write_manifests(args.manifest, args.method)
        union = os.path.join(os.path.dirname(args.manifest), "generated.jsonl")
        print(f"{n} images listed in {manifest}; all methods: {union}")
    print(json.dumps({"rank": rank, "world": world, "done": result.done, "existing": result.existing,
                      "skipped": result.skipped, "failed": result.failed}))
    return 1 if result.failed else 0


def run(args: argparse.Namespace) -> int:
    return _build(args) if args.action == "build" else _run(args)
