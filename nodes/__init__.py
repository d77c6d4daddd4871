"""The IdGlow ComfyUI node pack (V3 schema API). Imported by ComfyUI through the repository's ``__init__.py``.

Node classes live in ``face_nodes``, ``schedule_nodes``, ``model_nodes`` and ``score_nodes``; the ComfyUI-free
logic they call is in the ``_*.py`` modules (tested without ComfyUI). ``vlm.py`` adds the prompt-enricher nodes
when its dependencies import.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

from comfy_api.latest import ComfyExtension, io

if importlib.util.find_spec("idglow_core") is None:
    # A ComfyUI install does not put custom-node folders on sys.path. Append (never prepend) the pack folder, so
    # that ``idglow_core`` imports while ComfyUI's own top-level modules (``nodes``, ``utils``...) keep priority.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ._comfy import register_model_folders

register_model_folders()

from .face_nodes import IdGlowFaceAnalyzerLoader, IdGlowFaceSim, IdGlowMultiIDEncode  # noqa: E402
from .model_nodes import IdGlowAdapterLoader, IdGlowApply, IdGlowApplyAdvanced  # noqa: E402
from .schedule_nodes import IdGlowSchedule, IdGlowStaticPrompt  # noqa: E402
from .score_nodes import IdGlowAestheticScore  # noqa: E402

log = logging.getLogger("idglow")

NODES: list[type[io.ComfyNode]] = [
    IdGlowFaceAnalyzerLoader, IdGlowMultiIDEncode, IdGlowAdapterLoader, IdGlowSchedule, IdGlowApply,
    IdGlowApplyAdvanced, IdGlowStaticPrompt, IdGlowFaceSim, IdGlowAestheticScore,
]


def _optional_nodes() -> list[type[io.ComfyNode]]:
    """The VLM prompt-enricher nodes, when ``nodes/vlm.py`` exists and imports (it needs transformers)."""
    try:
        from .vlm import NODES as vlm_nodes
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.vlm":
            return []
        log.warning("IdGlow: VLM prompt nodes are not available (%s); the other nodes work.", exc)
        return []
    except ImportError as exc:
        log.warning("IdGlow: VLM prompt nodes are not available (%s); the other nodes work.", exc)
        return []
    return list(vlm_nodes)


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in menu order."""
    return NODES + _optional_nodes()


class IdGlowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> IdGlowExtension:
    return IdGlowExtension()
