"""Shared test set-up: offline, CPU, small thread count, paths to the committed photos."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the public-domain test photos (see tests/data/PROVENANCE.md)."""
    return DATA


@pytest.fixture(scope="module")
def pipe():
    """The tiny offline Qwen-Image-Edit-Plus pipeline (one per test module; modules that need another define
    their own ``pipe``), with small reference images for speed."""
    from idglow_core.testing import small_edit_images, tiny_edit_pipeline

    with small_edit_images():
        yield tiny_edit_pipeline()


@pytest.fixture(scope="module")
def refs():
    """Two random 40x40 RGB 'portraits' (uint8) for the tiny pipeline."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
