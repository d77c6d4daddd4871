"""ComfyUI entry point of the IdGlow node pack (V3 schema API).

ComfyUI imports this folder as a package from ``ComfyUI/custom_nodes/`` and calls ``comfy_entrypoint``.
All real work lives in ``idglow_core`` (importable without ComfyUI); ``nodes/`` only converts types.
Outside ComfyUI (no ``comfy_api`` to import, e.g. when pytest collects this folder) nothing is exported.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
