"""IdGlow core library: multi-identity group photos with dynamic identity modulation.

Importable without ComfyUI. Submodules are imported on demand so that ``import idglow_core`` is cheap:

- ``idglow_core.faces``: face detection, alignment and embedding (dlib / insightface backends),
  plus the differentiable ArcFace path used by the ID loss.
- ``idglow_core.facesim``: Hungarian-matched FaceSim (paper Eq. 2) and the ID loss (Eq. 3).
- ``idglow_core.aesthetic``: LAION improved aesthetic predictor on CLIP ViT-L/14.
- ``idglow_core.evaluate``: batch evaluation of a manifest of generated images.
"""
from __future__ import annotations

import logging

from .errors import IdGlowError

__version__ = "0.1.0"
__all__ = ["IdGlowError", "__version__", "logger"]

logger = logging.getLogger("idglow")
logger.addHandler(logging.NullHandler())
