"""The IdGlow ComfyUI node pack (V3 schema API). Imported by ComfyUI through the repository's ``__init__.py``.

Node classes live in ``face_nodes``, ``schedule_nodes``, ``model_nodes``, ``score_nodes``, ``search_nodes`` and
``guidance_node`` (identity without an adapter); the ComfyUI-free
logic they call is in the ``_*.py`` modules (tested without ComfyUI); ``vlm.py`` holds the prompt-enricher nodes.
"""
from __future__ import annotations

import importlib.util
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
from .guidance_node import IdGlowIdentityGuidance  # noqa: E402
from .model_nodes import IdGlowAdapterLoader, IdGlowApply, IdGlowApplyAdvanced  # noqa: E402
from .schedule_nodes import IdGlowSchedule, IdGlowStaticPrompt  # noqa: E402
from .score_nodes import IdGlowAestheticScore  # noqa: E402
from .search_nodes import IdGlowSeedSearch, IdGlowSelectBest  # noqa: E402
from .vlm import NODES as VLM_NODES  # noqa: E402

NODES: list[type[io.ComfyNode]] = [
    IdGlowFaceAnalyzerLoader, IdGlowMultiIDEncode, IdGlowAdapterLoader, IdGlowSchedule, IdGlowApply,
    IdGlowApplyAdvanced, IdGlowStaticPrompt, IdGlowFaceSim, IdGlowAestheticScore,
    IdGlowSelectBest, IdGlowSeedSearch, IdGlowIdentityGuidance,
]


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in menu order."""
    return NODES + VLM_NODES


class IdGlowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> IdGlowExtension:
    return IdGlowExtension()
