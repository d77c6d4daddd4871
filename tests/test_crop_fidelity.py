"""Crop-decode fidelity (issue 12, point 9): the measurement behind ``loss.id_decode: crop``, checked against hand
values on decoders whose answer is known, and the real-scale config's choice.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from idglow_core.training.crop_fidelity import crop_decode_error, face_keypoints

ROOT = Path(__file__).resolve().parents[1]
NOISE = 1e-4  # float32 noise floor: the window's shifted keypoints give a crop transform ~1e-5 px apart


def _local(z: torch.Tensor) -> torch.Tensor:
    """A purely local decoder: pixel = f(its own latent cell), x8 nearest upsampling of 3 channels."""
    return 0.5 + 0.2 * torch.tanh(F.interpolate(z[:, :3, 0], scale_factor=8, mode="nearest"))


def _global(z: torch.Tensor) -> torch.Tensor:
    """The local decoder plus 0.01 x the mean of the whole latent, like a mid-block attention's global term."""
    return _local(z) + 0.01 * z.mean()


def _latents() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 1, 24, 24, generator=g)
    z[..., :, 16:] += 3.0  # the right-hand side differs, so a window's mean differs from the whole's
    return z


def test_local_decoder_gives_an_exact_window_decode():
    rows = crop_decode_error(_local, _latents(), [face_keypoints((60.0, 60.0), 64.0)], margins=[0, 2])
    assert [r["margin"] for r in rows] == [0, 2]
    assert all(r["max_abs"] < NOISE for r in rows)
    assert rows[0]["window_frac"] < rows[1]["window_frac"] < 1.0


def test_global_term_shows_up_as_the_difference_of_means():
    """Bilinear crops keep a constant offset: the error is exactly 0.01 |mean(window) - mean(latent)|."""
    z = _latents()
    kps = face_keypoints((60.0, 60.0), 64.0)
    row = crop_decode_error(_global, z, [kps], margins=[1])[0]
    y0, y1, x0, x1 = row["window"]
    want = 0.01 * abs(float(z[..., y0:y1, x0:x1].mean() - z.mean()))
    assert want > 1e-3
    assert row["mean_abs"] == pytest.approx(want, abs=NOISE) and row["max_abs"] == pytest.approx(want, abs=NOISE)
    full = crop_decode_error(_global, z, [kps], margins=[99])[0]  # the window is the whole latent: exact
    assert full["window"] == [0, 24, 0, 24] and full["max_abs"] < NOISE


def test_qwen_vae_architecture_window_decode_is_not_exact():
    """The Qwen-Image VAE decoder (here its tiny configuration: same blocks, mid-block self-attention included)
    never decodes a window exactly, whatever the margin short of the whole latent."""
    from idglow_core.testing import tiny_vae
    from idglow_core.training.sft import vae_decoder

    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 1, 24, 24, generator=g)  # x4 tiny VAE: 96 px
    rows = crop_decode_error(vae_decoder(tiny_vae()), z, [face_keypoints((40.0, 40.0), 40.0)], margins=[0, 4, 99])
    assert rows[0]["max_abs"] > 10 * NOISE and rows[1]["max_abs"] > 10 * NOISE
    assert rows[2]["max_abs"] < NOISE  # the whole latent: the same computation


def test_real_scale_config_decodes_full_without_real_weight_evidence():
    from idglow_core.training import load_config

    assert load_config(ROOT / "train" / "configs" / "sft_qwen_edit_2511.yaml").loss.id_decode == "full"
