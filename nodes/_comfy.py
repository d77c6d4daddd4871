"""What every IdGlow node shares inside ComfyUI: the custom socket types, the model folders, progress.

Model folders (all under ComfyUI's ``models/``; extra paths come from ``extra_model_paths.yaml``, e.g.
``insightface: /data/insightface``, and are kept):

- ``insightface``: ``buffalo_l/`` (or ``models/buffalo_l/``) with ``det_10g.onnx`` + ``w600k_r50.onnx``.
- ``idglow``: IdGlow adapter files (``*.safetensors``).
- ``aesthetic``: the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` and a CLIP ViT-L/14 folder (Hugging Face
  format), either directly or in one sub-folder per scorer.
"""
from __future__ import annotations

import os
from typing import Callable

import comfy.utils
import folder_paths
from comfy_api.latest import io

from idglow_core.errors import InputError

__all__ = ["FaceAnalyzerType", "IdsType", "AdapterType", "ScheduleType", "CATEGORY", "register_model_folders",
           "progress", "subfolders", "reference_image_inputs"]

CATEGORY = "IdGlow"
FaceAnalyzerType = io.Custom("IDGLOW_FACE_ANALYZER")
IdsType = io.Custom("IDGLOW_IDS")
AdapterType = io.Custom("IDGLOW_ADAPTER")
ScheduleType = io.Custom("IDGLOW_SCHEDULE")

MODEL_FOLDERS = {"insightface": set(), "idglow": {".safetensors"}, "aesthetic": set()}


def reference_image_inputs(batch_tooltip: str, numbered_tooltip: str, count: int = 4) -> list:
    """The reference-portrait inputs of every node that takes identities: an optional batch ``images`` plus
    ``count`` optional single images of any size (``numbered_tooltip`` is formatted with ``i``)."""
    return [io.Image.Input("images", optional=True, tooltip=batch_tooltip),
            *[io.Image.Input(f"image{i}", optional=True, tooltip=numbered_tooltip.format(i=i))
              for i in range(1, count + 1)]]


def register_model_folders() -> None:
    """Add ``models/<name>`` for each IdGlow folder, keeping paths users configured before the pack loaded."""
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=False)
        paths, exts = folder_paths.folder_names_and_paths[name]
        if extensions and not exts:
            folder_paths.folder_names_and_paths[name] = (paths, set(extensions))


def progress(total: int) -> Callable[[], None]:
    """A step function that moves ComfyUI's progress bar of the running node by one of ``total`` steps."""
    bar = comfy.utils.ProgressBar(max(1, total))
    return lambda: bar.update(1)


def subfolders(folder_name: str) -> list[str]:
    """Names of the sub-folders of every path of a model folder, plus '.' for a path that is itself a model."""
    names: list[str] = []
    for root in folder_paths.get_folder_paths(folder_name):
        if not os.path.isdir(root):
            continue
        if any(f.endswith((".pth", ".safetensors")) for f in os.listdir(root)):
            names.append(".")
        names += sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    return sorted(set(names))


def resolve_subfolder(folder_name: str, name: str) -> str:
    """The full path of ``name`` (a sub-folder name, or '.') inside the ``folder_name`` model folders."""
    for root in folder_paths.get_folder_paths(folder_name):
        path = os.path.normpath(os.path.join(root, name))
        if os.path.isdir(path) and os.path.commonpath([path, os.path.normpath(root)]) == os.path.normpath(root):
            return path
    raise InputError(f"'{name}' is not a folder inside the '{folder_name}' model folders "
                     f"{folder_paths.get_folder_paths(folder_name)}. Put the model files there and refresh the page.")
