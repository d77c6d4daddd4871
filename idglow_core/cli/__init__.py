"""Command-line entry: ``python -m idglow_core <command> [options]``.

Each command is a module ``idglow_core/cli/<name>.py`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import IdGlowError

COMMANDS = {
    "facesim": "Score one generated image against reference portraits (Hungarian-matched FaceSim).",
    "evaluate": "Evaluate a JSONL manifest of generated images: FaceSim + aesthetic, paper-style table.",
    "bench": "Build the benchmark from identity portraits, or run a method (IdGlowPipeline / ComfyUI) over it.",
    "generate": "Generate a group photo (Task 1) or an age-transformed group (Task 2) with IdGlowPipeline.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m idglow_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    head, rest = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if head.command is None:  # pragma: no cover - argparse exits before this
        return 2
    module = importlib.import_module(f"{__name__}.{head.command}")
    sub = argparse.ArgumentParser(prog=f"python -m idglow_core {head.command}", description=COMMANDS[head.command])
    sub.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except IdGlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
