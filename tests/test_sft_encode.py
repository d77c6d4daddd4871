"""Encoding of training samples against diffusers' own conventions, the on-disk encoding cache, and the ID-loss
path of Algorithm 1 on the real tiny stack.

- VAE latents are normalised exactly as ``QwenImageEditPlusPipeline._encode_vae_image`` does
  (``(z - latents_mean) / latents_std``) and the ID-loss decoder inverts it (checked with a VAE whose mean and
  std are not 0 / 1, unlike the tiny test VAE, so a missing or inverted normalisation would show);
- the cache holds only what depends on the files, prompt, sizes and model (latents, prompt embeddings): the
  identity inputs (face-analyzer embeddings, ID-loss reference embeddings) come from the current run's face
  models, so changing the face backend or switching the ID loss on never reads stale values;
- the ID term's gradient reaches the adapter through the real VAE decoder and the differentiable crop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idglow_core.faces.base import Face
from idglow_core.training.data import Sample
from idglow_core.training.encode import SampleEncoder, collate
from idglow_core.training.identity import IdentityLoss, tiny_arcface
from idglow_core.training.sft import vae_decoder

AREAS = (32 * 32, 32 * 32)  # VLM and VAE reference areas: tiny, so one encode takes a fraction of a second


def _vae_with_statistics():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.5, -1.0, 2.0, 0.0],
                                  latents_std=[2.0, 0.5, 4.0, 1.5]).eval()


def test_vae_normalisation_matches_the_pipeline_and_decoder_inverts_it():
    from idglow_core.testing import tiny_edit_pipeline

    pipe = tiny_edit_pipeline(text_encoder=False)
    vae = _vae_with_statistics()
    pipe.register_modules(vae=vae)
    image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    ours = SampleEncoder(pipe, None, 32, areas=AREAS).encode_image(image)          # [C, 1, h, w]
    x = pipe.image_processor.preprocess(Image.fromarray(image), 32, 64).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
    with torch.no_grad():
        theirs = pipe._encode_vae_image(x, generator=None)[0]
        raw = vae.encode(x).latent_dist.mode()[0]
    assert ours.shape == (4, 1, 8, 16) and torch.allclose(ours, theirs, atol=1e-6)
    mean, std = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 4.0, 1.5])
    assert torch.allclose(ours, (raw - mean.view(4, 1, 1, 1)) / std.view(4, 1, 1, 1), atol=1e-6)
    with torch.no_grad():
        decoded = vae_decoder(vae)(ours[None])                                    # [1, 3, H, W] in [0, 1]
        direct = ((vae.decode(raw[None]).sample[:, :, 0] + 1) / 2).clamp(0, 1)   # what the pipeline shows
    assert decoded.shape == (1, 3, 32, 64) and torch.allclose(decoded, direct, atol=1e-5)


def _face(embedding: np.ndarray, w: int = 40, h: int = 40) -> Face:
    kps = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32) * [w, h]
    return Face(np.array([0, 0, w, h], np.float32), kps.astype(np.float32), 1.0,
                (embedding / np.linalg.norm(embedding)).astype(np.float32))


def _sample(folder, faces: list[Face]) -> Sample:
    rng = np.random.default_rng(1)
    paths = []
    for name in ("target.png", "a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return Sample(line=1, target=paths[0], refs=paths[1:], prompt="two people", task="group", ref_faces=faces)


@pytest.fixture(scope="module")
def pipe():
    from idglow_core.testing import tiny_edit_pipeline

    return tiny_edit_pipeline(text_encoder=True)


def test_cache_never_serves_identity_data_of_another_face_model(pipe, tmp_path):
    cache = tmp_path / "cache"
    first = _sample(tmp_path, [_face(np.arange(1.0, 9.0)), _face(np.arange(8.0, 0.0, -1))])
    a = SampleEncoder(pipe, None, 32, cache_dir=cache, areas=AREAS)(0, first)   # e.g. a DPO run: no ID loss
    assert len(list(cache.glob("*.safetensors"))) == 1 and "ref_face_embeds" not in a

    # same files and prompt, another face backend (other embeddings, other width) and the ID loss on
    faces = [_face(np.linspace(-1, 1, 16)), _face(np.cos(np.arange(16.0)))]
    second = _sample(tmp_path, faces)
    identity = IdentityLoss(lambda image: [], tiny_arcface(dim=8, size=16))
    b = SampleEncoder(pipe, identity, 32, cache_dir=cache, areas=AREAS)(0, second)
    assert torch.equal(b["latents"], a["latents"]) and torch.equal(b["prompt_embeds"], a["prompt_embeds"])  # cached
    assert torch.equal(b["id_embeds"], torch.from_numpy(np.stack([f.embedding for f in faces])))
    refs = [np.asarray(Image.open(p).convert("RGB")) for p in second.refs]
    want = torch.cat([identity.reference_embeddings(r, [f.kps]) for r, f in zip(refs, faces)])
    assert b["ref_face_embeds"].shape == (2, 8) and torch.allclose(b["ref_face_embeds"], want, atol=1e-6)
    assert collate([b])["ref_face_embeds"][0].shape == (2, 8)


class FixedFaces:
    """Detector stub: one face at fixed relative keypoints; records the images it was shown."""

    def __init__(self):
        self.shown = []

    def __call__(self, image: np.ndarray):
        self.shown.append(image)
        h, w = image.shape[:2]
        rel = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)
        return [rel * [w, h]]


def test_id_loss_gradient_reaches_the_adapter_through_the_real_decoder():
    """Algorithm 1 lines 13-15 on the tiny Qwen-Image-Edit stack: the detector sees the decoded one-step
    estimate at the decoder's pixel size, and the ID term alone moves the adapter's gradients (not the base)."""
    from idglow_core.testing import tiny_edit_pipeline
    from idglow_core.training.config import LossConfig, load_config
    from idglow_core.training.models import build_train_module
    from idglow_core.training.sft import SFTStep

    cfg = load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml",
                      ["run.train=adapter", "run.gradient_checkpointing=false"])
    pipe = tiny_edit_pipeline(text_encoder=False)
    pipe.register_modules(vae=_vae_with_statistics())
    torch.manual_seed(0)
    module = build_train_module(cfg, pipe, id_dim=8)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 4, 1, 8, 8, generator=g),
             "ref_latents": [torch.randn(1, 4, 1, 8, 8, generator=g)],
             "prompt_embeds": torch.randn(1, 5, 16, generator=g), "prompt_mask": torch.ones(1, 5, dtype=torch.long),
             "id_embeds": torch.nn.functional.normalize(torch.randn(1, 1, 8, generator=g), dim=-1),
             "id_mask": torch.ones(1, 1, dtype=torch.bool),
             "ref_face_embeds": [torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=-1)]}
    for blk in module.adapter.blocks:  # a trained-looking adapter
        torch.nn.init.normal_(blk.to_out.weight, std=0.2)
    grads = {}
    for weight in (0.0, 10.0):
        detector = FixedFaces()
        step = SFTStep(LossConfig(id_weight=weight, schedule="constant"), vae_decoder(pipe.vae),
                       IdentityLoss(detector, tiny_arcface(dim=8, size=16)))
        module.zero_grad(set_to_none=True)
        out = step(module, batch, torch.Generator().manual_seed(1))
        out.loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        if weight:
            assert [im.shape for im in detector.shown] == [(32, 32, 3)] and detector.shown[0].dtype == np.uint8
            assert 0 < out.logs["loss/id"][0] < 2
        else:
            assert detector.shown == []  # Omega * lambda = 0: no decode, no detection
    assert set(grads[10.0]) == set(grads[0.0]) and all(n.startswith("adapter.") for n in grads[0.0])
    moved = [n for n in grads[0.0] if not torch.allclose(grads[0.0][n], grads[10.0][n], atol=1e-7)]
    assert any("to_out" in n for n in moved) and any(n.startswith("adapter.encoder") for n in moved)
