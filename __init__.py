"""ComfyUI entry point of the IdGlow node pack (V3 schema API).

ComfyUI imports this folder as a package from ``ComfyUI/custom_nodes/`` and calls ``comfy_entrypoint``.
All real work lives in ``idglow_core`` (importable without ComfyUI); ``nodes/`` only converts types.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
