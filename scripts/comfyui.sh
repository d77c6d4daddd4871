#!/usr/bin/env bash
# Sourced by scripts/test.sh after bootstrap.sh: points COMFYUI_DIR at a real ComfyUI for the tests that need one.
# A COMFYUI_DIR you set is kept. Otherwise, where the workplace's ComfyUI snapshots exist (../shared/comfyui, see
# its README), the snapshot of IDGLOW_COMFYUI_VERSION (default 0.8.0) is extracted once under .cache/comfyui and
# its requirements are installed into this venv (CPU torch kept). Without either, those tests skip and say why.
if [ -z "${COMFYUI_DIR:-}" ]; then
  SNAPSHOTS="$ROOT/../shared/comfyui"
  if [ -f "$SNAPSHOTS/setup.sh" ]; then
    COMFYUI_DIR="$(bash "$SNAPSHOTS/setup.sh" "$ROOT/.cache/comfyui" "$VENV/bin/python" "${IDGLOW_COMFYUI_VERSION:-0.8.0}")"
    export COMFYUI_DIR
  fi
fi
