"""One SFT step (Algorithm 1, Eq. 1-5) against a hand computation from the same tensors.

The network is a one-parameter stand-in (v = w * z_t), the decoder a fixed differentiable map, the face
detector a stub returning two fixed keypoint sets per image (so the ID-loss path runs with gradients), and
the face encoder the tiny random ArcFace. Nothing here needs the real models.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idglow_core.faces.arcface import crop_faces
from idglow_core.training.config import LossConfig
from idglow_core.training.identity import IdentityLoss, tiny_arcface
from idglow_core.training.sft import SFTStep

KPS = [np.array([[8, 10], [20, 10], [14, 16], [9, 22], [19, 22]], np.float32),
       np.array([[40, 12], [52, 12], [46, 18], [41, 24], [51, 24]], np.float32)]


class Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, z_t, t, refs, pe, pm, ids, id_mask, inject=None):
        self.inject = inject
        return self.w * z_t


def decode(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(F.interpolate(z[:, :3, 0], size=(32, 64), mode="bilinear", align_corners=False))


class CountingDetector:
    def __init__(self, kps):
        self.kps, self.calls = kps, 0

    def __call__(self, image: np.ndarray):
        assert image.dtype == np.uint8 and image.shape == (32, 64, 3)
        self.calls += 1
        return list(self.kps)


def _batch():
    g = torch.Generator().manual_seed(5)
    refs = [F.normalize(torch.randn(2, 8, generator=g), dim=-1) for _ in range(2)]
    return {"latents": torch.randn(2, 4, 1, 4, 8, generator=g), "ref_latents": [], "prompt_embeds": torch.zeros(2, 3, 4),
            "prompt_mask": torch.ones(2, 3), "id_embeds": torch.zeros(2, 2, 8), "id_mask": torch.ones(2, 2, dtype=torch.bool),
            "ref_face_embeds": refs}


def test_one_step_loss_matches_hand_computation():
    arcface = tiny_arcface(dim=8, size=16)
    detector = CountingDetector(KPS)
    cfg = LossConfig(task="group", id_weight=0.5)  # anneal(tau=0.3), Eq. 4
    step = SFTStep(cfg, decode, IdentityLoss(detector, arcface))
    module, batch = Velocity(), _batch()
    out = step(module, batch, torch.Generator().manual_seed(1))

    # --- by hand, drawing t and eps exactly as the step does (uniform t, then eps) ---
    g = torch.Generator().manual_seed(1)
    t = torch.rand(2, generator=g)
    assert t[0] > 0.3 > t[1]  # sample 0 gets the ID loss, sample 1 is skipped (Omega = 0)
    z0 = batch["latents"]
    eps = torch.randn(z0.shape, generator=g)
    w = module.w.detach()
    total = []
    for i in range(2):
        zt = (1 - t[i]) * z0[i] + t[i] * eps[i]
        v = w * zt
        flow = ((v - (eps[i] - z0[i])) ** 2).mean()                     # Eq. 1, flow term
        omega = max(0.0, (t[i].item() - 0.3) / 0.7)                      # Eq. 4
        id_term = 0.0
        if omega > 0:
            img = decode((zt - t[i] * v)[None])                          # one-step estimate, decoded
            kps = torch.from_numpy(np.stack(KPS))
            gen = arcface(crop_faces(img, kps, torch.zeros(2, dtype=torch.long), 16))
            cos = F.normalize(batch["ref_face_embeds"][i], dim=-1) @ gen.T
            best = max(itertools.permutations(range(2)), key=lambda p: sum(cos[j, p[j]].item() for j in range(2)))
            id_term = sum(1 - cos[j, best[j]] for j in range(2)) / 2          # Eq. 2-3
        total.append(flow + omega * 0.5 * id_term)
    expected = torch.stack([torch.as_tensor(x) for x in total]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert detector.calls == 1  # only the active sample was decoded and searched
    assert out.logs["id_loss/active_frac"] == 0.5
    assert out.logs["omega/mean"] == pytest.approx((t[0].item() - 0.3) / 0.7 / 2, rel=1e-5)
    assert len(out.logs["loss/id"]) == 1 and f"loss/id/t_bin_{int(t[0] * 10)}" in out.logs
    assert out.logs["faces/missing_frac"] == [0.0, 0.0]
    out.loss.backward()
    assert module.w.grad is not None and module.w.grad.abs() > 0


def test_missing_faces_count_one_per_reference_and_zero_weight_skips_decode():
    detector = CountingDetector([])  # finds nothing, like the tiny random model's decodes
    step = SFTStep(LossConfig(task="group", schedule="constant", id_weight=0.5), decode,
                   IdentityLoss(detector, tiny_arcface(dim=8, size=16)))
    module, batch = Velocity(), _batch()
    out = step(module, batch, torch.Generator().manual_seed(1))
    assert out.logs["loss/id"] == [1.0, 1.0]  # missing-face value 1.0 per reference, averaged
    assert out.logs["faces/missing_frac"] == [1.0] * 4
    assert out.loss.item() == pytest.approx(out.logs["loss/flow"] + 0.5 * 1.0, rel=1e-6)  # Omega = 1

    ablation = SFTStep(LossConfig(task="group", id_weight=0.0), decode, IdentityLoss(detector, tiny_arcface()))
    calls = detector.calls
    out = ablation(module, batch, torch.Generator().manual_seed(1))
    assert detector.calls == calls and out.logs["id_loss/active_frac"] == 0.0 and "loss/id" not in out.logs
    assert out.loss.item() == pytest.approx(out.logs["loss/flow"], rel=1e-6)


def test_age_task_uses_the_gate_window():
    age = LossConfig(task="age", id_weight=1.0)
    assert age.omega_per_sample(None, torch.tensor([0.2, 0.45, 0.7])).tolist() == [0.0, 1.0, 0.0]  # Eq. 5
    assert LossConfig(task="group").omega_per_sample(None, torch.tensor([0.3, 1.0])).tolist() == [0.0, 1.0]
