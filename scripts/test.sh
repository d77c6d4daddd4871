#!/usr/bin/env bash
# Runs the whole test suite on CPU, offline. Usage: bash scripts/test.sh [pytest args]
# Tests against a real ComfyUI use COMFYUI_DIR (set up from ../shared/comfyui when present, see scripts/comfyui.sh);
# the browser tests also need Debian's chromium (apt-get install chromium). Each skips with the reason otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
source "$ROOT/scripts/comfyui.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
