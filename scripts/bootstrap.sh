#!/usr/bin/env bash
# Creates .venv (once) and installs everything IdGlow needs into it. Sourced by the other scripts.
# Needs only Python 3.10+ and the package registries. Re-running is cheap: a stamp file records the
# hash of the requirement files, and nothing is reinstalled while it matches.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IDGLOW_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.idglow-installed"
WANT="$(cat "$ROOT"/requirements*.txt "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # CPU torch when the venv has none (a ComfyUI venv keeps its own build).
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    # Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose a build explicitly.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  TORCH_VERSION="$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")"
  "$VENV/bin/python" -m pip install -q -c <(echo "torch==$TORCH_VERSION") -r "$ROOT/requirements.txt" -r "$ROOT/requirements-train.txt" -r "$ROOT/requirements-test.txt"
  "$VENV/bin/python" -m pip install -q --no-deps "insightface>=0.7.3"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
