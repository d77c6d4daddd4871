#!/usr/bin/env bash
# The main job on the embedded default: evaluate the shipped example set (group composites of public-domain
# photos, correct assignment known) with the offline dlib face backend, and print the paper-style table.
# Usage: bash scripts/demo.sh [extra evaluate options, e.g. --aesthetic-dir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec python -m idglow_core evaluate --manifest demo/group_set/manifest.jsonl --out out/example_eval \
  --backend dlib "$@"
