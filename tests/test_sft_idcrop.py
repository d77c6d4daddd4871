"""``loss.id_decode=crop``: the ID loss decoding with gradient only each face's latent window.

The window maths (crop square -> pixel box -> latent window -> keypoint shift) is checked against numbers worked
out by hand; the loss against ``full`` on the tiny random Qwen-Image VAE (x4) with a fixed-keypoint detector:
identical when the margin covers the whole latent, close with a small margin, gradients only inside the
windows, and the missing-face accounting unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idglow_core.errors import ConfigError, InputError
from idglow_core.faces.align import arcface_template
from idglow_core.faces.arcface import crop_faces
from idglow_core.testing import tiny_vae
from idglow_core.training.config import LossConfig, load_config
from idglow_core.training.identity import (IdentityLoss, LatentWindow, crop_pixel_box, latent_window,
                                           tiny_arcface)
from idglow_core.training.sft import SFTStep, vae_decoder

T32 = arcface_template(32)  # the tiny ArcFace's 32-px template
T112 = arcface_template(112)
# Two faces, ~39 px wide, in a 128 x 128 image (latent 32 x 32 at x4); each crop covers ~38 x 38 px.
KPS = [T112 * 0.35 + np.array([10, 30], np.float32), T112 * 0.35 + np.array([70, 40], np.float32)]


class FixedDetector:
    """Returns ``per_call[i]`` on the i-th image it is shown (cycling), counting calls."""

    def __init__(self, *per_call):
        self.per_call, self.calls = per_call, 0

    def __call__(self, image: np.ndarray):
        assert image.dtype == np.uint8 and image.ndim == 3
        out = self.per_call[self.calls % len(self.per_call)]
        self.calls += 1
        return [k.copy() for k in out]


def _refs(n: int, k: int = 2, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(k, 8, generator=g), dim=-1) for _ in range(n)]


def _latents(b: int, side: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, 4, 1, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decode():
    return vae_decoder(tiny_vae())


def test_crop_box_is_the_inverse_similarity_of_the_crop_corners():
    # keypoints = template + (40, 20): M is a pure translation, the crop reads pixels 40..71 x 20..51
    assert crop_pixel_box(T32 + np.array([40, 20], np.float32), 32) == pytest.approx((40, 20, 71, 51), abs=1e-3)
    # keypoints = 2 * template + (8, 4): scale 1/2, the 32 px crop spans 2 * 31 = 62 px
    assert crop_pixel_box(T32 * 2 + np.array([8, 4], np.float32), 32) == pytest.approx((8, 4, 70, 66), abs=1e-3)
    # keypoints rotated by 90 degrees, p = (-y, x) + (50, 10): corner (31, 0) -> (50, 41), (0, 31) -> (19, 10)
    rotated = np.stack([-T32[:, 1], T32[:, 0]], 1) + np.array([50, 10], np.float32)
    assert crop_pixel_box(rotated, 32) == pytest.approx((19, 10, 50, 41), abs=1e-3)


def test_crop_box_bounds_every_pixel_the_differentiable_crop_reads():
    kps = np.stack([-T32[:, 1], T32[:, 0]], 1) * 0.8 + np.array([40, 7], np.float32)
    kps = kps @ np.array([[0.96, -0.28], [0.28, 0.96]], np.float32).T  # plus a rotation by ~16 degrees
    image = torch.ones(1, 3, 80, 80, requires_grad=True)
    crop_faces(image, torch.from_numpy(kps)[None], torch.zeros(1, dtype=torch.long), 32).sum().backward()
    ys, xs = torch.nonzero(image.grad[0].abs().sum(0), as_tuple=True)
    x0, y0, x1, y1 = crop_pixel_box(kps, 32)
    assert xs.min() >= np.floor(x0) and xs.max() <= np.ceil(x1)
    assert ys.min() >= np.floor(y0) and ys.max() <= np.ceil(y1)
    assert xs.max() - xs.min() > 20 and ys.max() - ys.min() > 20  # the crop did read a large area


def test_latent_window_by_hand():
    # pixels 40..71 x 20..51 at x4 -> cells 10..17 x 5..12, +2 margin -> x [8, 20), y [3, 15)
    assert latent_window((40, 20, 71, 51), 4, (32, 32), 2) == LatentWindow(y0=3, y1=15, x0=8, x1=20)
    # a box edge a hair off an integer (float noise) does not add a cell: 71.0004 -> pixel 71
    assert latent_window((39.9996, 20, 71.0004, 51), 4, (32, 32), 0) == LatentWindow(y0=5, y1=13, x0=10, x1=18)
    # x8: pixels 8..70 x 4..66 -> cells 1..8 x 0..8, margin 1 -> x [0, 10), y [-1 -> 0, 10)
    assert latent_window((8, 4, 70, 66), 8, (16, 16), 1) == LatentWindow(y0=0, y1=10, x0=0, x1=10)
    # clamped at the far border: pixels 100..140 x 100..150 -> cells 25..35 x 25..37, margin 3 -> [22, 32)
    assert latent_window((100, 100, 140, 150), 4, (32, 32), 3) == LatentWindow(y0=22, y1=32, x0=22, x1=32)
    # a box outside the image still gives a non-empty window at the nearest corner
    assert latent_window((-50, -50, -10, -10), 4, (32, 32), 0) == LatentWindow(y0=0, y1=1, x0=0, x1=1)
    assert latent_window((200, 10, 250, 20), 4, (32, 32), 0) == LatentWindow(y0=2, y1=6, x0=31, x1=32)
    # keypoints move into the window's pixel frame by (-4 * x0, -4 * y0) = (-32, -12)
    kps = np.array([[40.5, 20.25], [60, 30], [50, 40], [45, 45], [55, 45]], np.float32)
    shifted = LatentWindow(y0=3, y1=15, x0=8, x1=20).shift(kps, 4)
    assert shifted.tolist()[0] == [8.5, 8.25] and shifted.tolist()[4] == [23.0, 33.0]


def test_whole_latent_margin_gives_the_full_loss_and_gradients(decode):
    identity = IdentityLoss(FixedDetector(KPS), tiny_arcface(dim=8, size=32))
    z_full, z_crop = _latents(2).requires_grad_(True), _latents(2).requires_grad_(True)
    full = identity(decode(z_full), _refs(2))
    crop = identity.on_latents(z_crop, decode, _refs(2), margin=100)
    assert crop.loss.tolist() == pytest.approx(full.loss.tolist(), rel=1e-6, abs=0)
    assert crop.faces == full.faces == [2, 2] and crop.missing == full.missing == [0, 0]
    full.loss.sum().backward()
    crop.loss.sum().backward()
    scale = z_full.grad.abs().max()
    assert scale > 0 and torch.allclose(z_crop.grad, z_full.grad, rtol=1e-5, atol=1e-6 * scale)


def test_small_margin_is_close_and_grads_stay_in_the_windows(decode):
    identity = IdentityLoss(FixedDetector(KPS), tiny_arcface(dim=8, size=32))
    full = identity(decode(_latents(1)), _refs(1)).loss.item()
    z = _latents(1).requires_grad_(True)
    crop = identity.on_latents(z, decode, _refs(1), margin=2)
    assert crop.loss.item() == pytest.approx(full, abs=0.02)  # measured 0.0039 on this tiny VAE (full 0.788)
    crop.loss.sum().backward()
    windows = [latent_window(crop_pixel_box(k, 32), 4, (32, 32), 2) for k in KPS]
    assert windows == [LatentWindow(5, 20, 0, 15), LatentWindow(8, 22, 15, 30)]  # by hand as in the test above
    grad = z.grad[0, :, 0].abs().sum(0)  # [h, w]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    for w in windows:
        inside[w.y0:w.y1, w.x0:w.x1] = True
        assert bool((grad[w.y0:w.y1, w.x0:w.x1] > 0).all())
    assert inside.float().mean() < 0.5 and bool((grad[~inside] == 0).all())


def test_missing_faces_count_the_same_in_both_modes(decode):
    one_then_none = (KPS[:1], [])  # image 0: one face for two references; image 1: no face
    z_full, z_crop = _latents(2).requires_grad_(True), _latents(2).requires_grad_(True)
    full = IdentityLoss(FixedDetector(*one_then_none), tiny_arcface(dim=8, size=32))(decode(z_full), _refs(2))
    crop = IdentityLoss(FixedDetector(*one_then_none), tiny_arcface(dim=8, size=32)).on_latents(
        z_crop, decode, _refs(2), margin=100)
    assert crop.faces == full.faces == [1, 0] and crop.missing == full.missing == [1, 2] and crop.refs == [2, 2]
    assert crop.loss[1].item() == full.loss[1].item() == 1.0  # 1.0 per missing reference, averaged
    assert crop.loss[0].item() == pytest.approx(full.loss[0].item(), rel=1e-6) and 0.5 < crop.loss[0].item() < 1.0
    crop.loss.sum().backward()
    assert z_crop.grad is not None and z_crop.grad[1].abs().max() == 0 and z_crop.grad[0].abs().max() > 0
    z = _latents(1).requires_grad_(True)  # no face anywhere: the loss still hangs on the latents (DDP)
    none = IdentityLoss(FixedDetector([]), tiny_arcface(dim=8, size=32)).on_latents(z, decode, _refs(1))
    assert none.loss.tolist() == [1.0] and none.missing == [2] and none.loss.requires_grad
    none.loss.sum().backward()
    assert z.grad is not None and z.grad.abs().max() == 0


def test_crop_mode_needs_a_whole_scale_factor_decoder():
    def squash(z):  # 8 x 8 latent -> 30 x 30 pixels: no whole factor, so windows cannot be mapped
        return torch.sigmoid(F.interpolate(z[:, :3, 0], size=(30, 30), mode="bilinear", align_corners=False))

    identity = IdentityLoss(FixedDetector(KPS), tiny_arcface(dim=8, size=32))
    with pytest.raises(InputError, match="whole factor"):
        identity.on_latents(_latents(1, side=8), squash, _refs(1))


class Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, z_t, t, refs, pe, pm, ids, id_mask, inject=None):
        return self.w * z_t


def test_sft_step_crop_mode_matches_full_and_uses_the_detect_decoder(decode):
    g = torch.Generator().manual_seed(5)
    batch = {"latents": torch.randn(1, 4, 1, 32, 32, generator=g), "ref_latents": [],
             "prompt_embeds": torch.zeros(1, 3, 4), "prompt_mask": torch.ones(1, 3), "id_embeds": torch.zeros(1, 2, 8),
             "id_mask": torch.ones(1, 2, dtype=torch.bool), "ref_face_embeds": _refs(1)}
    detect_calls = []

    def detect_decode(z):
        detect_calls.append(torch.is_grad_enabled())
        return decode(z)

    results = {}
    for mode in ("full", "crop"):
        cfg = LossConfig(schedule="constant", id_weight=0.5, id_decode=mode, id_crop_margin=100)
        module = Velocity()
        step = SFTStep(cfg, decode, IdentityLoss(FixedDetector(KPS), tiny_arcface(dim=8, size=32)), detect_decode)
        out = step(module, batch, torch.Generator().manual_seed(1))
        out.loss.backward()
        results[mode] = (out.loss.item(), out.logs["loss/id"], module.w.grad.item(), step.counts)
    assert detect_calls == [False]  # only the crop step decoded for detection, without gradient
    assert results["crop"][0] == pytest.approx(results["full"][0], rel=1e-6)
    assert results["crop"][1] == pytest.approx(results["full"][1], rel=1e-6)
    assert results["crop"][2] == pytest.approx(results["full"][2], rel=1e-4) and results["crop"][2] != 0
    assert results["crop"][3] == results["full"][3]


def test_tiled_detection_decoder(monkeypatch):
    vae = tiny_vae()
    vae.tile_sample_min_height = vae.tile_sample_min_width = 32  # 8 latent cells at x4
    vae.tile_sample_stride_height = vae.tile_sample_stride_width = 24
    calls = []
    real = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda z, **kw: calls.append(tuple(z.shape)) or real(z, **kw))
    tiled, plain = vae_decoder(vae, tiled=True), vae_decoder(vae)
    with torch.no_grad():
        small = _latents(1, side=8)
        assert torch.equal(tiled(small), plain(small)) and calls == []  # fits one tile: the ordinary decode
        big = tiled(_latents(1, side=16))
    assert calls == [(1, 4, 1, 16, 16)] and big.shape == (1, 3, 64, 64) and 0 <= big.min() <= big.max() <= 1


def test_config_field_and_real_scale_config():
    assert LossConfig().id_decode == "full" and LossConfig().id_crop_margin == 4
    with pytest.raises(ConfigError, match="id_decode"):
        LossConfig(id_decode="tiles")
    with pytest.raises(ConfigError, match="id_crop_margin"):
        LossConfig(id_crop_margin=-1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "sft_qwen_edit_2511.yaml")
    assert cfg.loss.id_decode == "full" and cfg.loss.id_crop_margin >= 1  # crop needs real-weight evidence


def test_run_sft_wires_crop_mode(tmp_path):
    from idglow_core.testing import OneFaceAnalyzer as OneFace  # one face per image for two references
    from idglow_core.training.sft import run_sft

    tiny = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml"
    rows = {}
    for mode in ("full", "crop"):  # the tiny run's latent is smaller than the margin: same numbers
        cfg = load_config(tiny, [f"run.output_dir={tmp_path / mode}", f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.synthetic=2", "loss.schedule=constant", "run.tensorboard=false",
                                 "optim.max_steps=1", f"loss.id_decode={mode}"])
        rows[mode] = run_sft(cfg, analyzer=OneFace()).history[-1]
    assert rows["crop"]["faces/missing_frac"] == rows["full"]["faces/missing_frac"] == 0.5
    assert rows["crop"]["loss/id"] == pytest.approx(rows["full"]["loss/id"], rel=1e-6)
