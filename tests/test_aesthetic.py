"""LAION aesthetic predictor on a tiny random CLIP and a random head, offline."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from idglow_core.aesthetic import CLIP_MEAN, CLIP_STD, AestheticMLP, AestheticScorer, load_mlp, preprocess_for_clip
from idglow_core.errors import ModelFormatError, ModelNotFoundError


def make_tiny_aesthetic_dir(folder, seed=0):
    """A folder laid out like a user's: the head file plus a CLIP sub-folder (tiny random, projection 768)."""
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=768)
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder / "clip-vit-large-patch14")
    mlp = AestheticMLP()
    torch.save(mlp.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_aesthetic_dir(tmp_path_factory.mktemp("aes"))


def test_head_is_the_composed_affine_map(tiny_dir):
    mlp = load_mlp(tiny_dir / "sac+logos+ava1-l14-linearMSE.pth")
    assert sum(p.numel() for p in mlp.parameters()) == 927_969  # the published head's size
    lin = [mlp.layers[i] for i in (0, 2, 4, 6, 7)]
    W = lin[0].weight.double().T
    b = lin[0].bias.double()
    for layer in lin[1:]:  # no activations: x W0^T + b0 -> ... composed by hand
        b = b @ layer.weight.double().T + layer.bias.double()
        W = W @ layer.weight.double().T
    x = torch.nn.functional.normalize(torch.randn(3, 768, dtype=torch.float64), dim=-1)
    np.testing.assert_allclose(mlp.double()(x).numpy(), (x @ W + b).squeeze(-1).numpy(), rtol=1e-10, atol=1e-10)


def test_score_equals_manual_pipeline_and_has_gradients(tiny_dir):
    scorer = AestheticScorer.from_dir(tiny_dir)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)]
    got = scorer.score(imgs)
    assert got.shape == (2,)
    for img, s in zip(imgs, got):
        px = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        emb = scorer.clip(pixel_values=preprocess_for_clip(px, 28)).image_embeds
        want = scorer.mlp(emb / emb.norm(dim=-1, keepdim=True))
        assert s == pytest.approx(want.item(), abs=1e-5)
    px = torch.rand(1, 3, 32, 32, requires_grad=True)
    scorer.score_tensor(px).sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0


def test_preprocess_constant_image_and_centre_crop():
    x = torch.full((1, 3, 20, 40), 0.5)
    out = preprocess_for_clip(x, 10)
    assert out.shape == (1, 3, 10, 10)
    want = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], want)
    # left third black, rest white: the centre crop of the 10x20 resize keeps columns 5..14, all white
    y = torch.ones(1, 3, 20, 40)
    y[..., :8] = 0
    crop = preprocess_for_clip(y, 10)
    torch.testing.assert_close(crop[0, :, :, -1], ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None].expand(3, 10))


def test_grayscale_and_rgba_inputs_are_scored(tiny_dir):
    scorer = AestheticScorer.from_dir(tiny_dir)
    gray = np.full((30, 30), 128, np.uint8)
    rgba = np.dstack([np.full((30, 30, 3), 128, np.uint8), np.full((30, 30), 255, np.uint8)])
    s = scorer.score([gray, rgba])
    assert s.shape == (2,) and s[0] == pytest.approx(s[1], abs=1e-5)


def test_safetensors_head_loads_identically(tiny_dir, tmp_path):
    state = torch.load(tiny_dir / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    save_file(state, tmp_path / "head.safetensors")
    a, b = load_mlp(tiny_dir / "sac+logos+ava1-l14-linearMSE.pth"), load_mlp(tmp_path / "head.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_files_raise_typed_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="improved-aesthetic-predictor"):
        load_mlp(tmp_path / "nope.pth")
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(ModelFormatError, match="missing keys"):
        load_mlp(tmp_path / "wrong.pth")
    torch.save({"layers.0.weight": object()}, tmp_path / "pickle.pth")  # refused by weights_only
    with pytest.raises(ModelFormatError, match="weights-only"):
        load_mlp(tmp_path / "pickle.pth")
    with pytest.raises(ModelNotFoundError, match="must hold"):
        AestheticScorer.from_dir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        AestheticScorer.from_dir(tmp_path / "missing")


def test_wrong_projection_dim_is_refused(tmp_path):
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=512)
    with pytest.raises(ModelFormatError, match="ViT-L/14"):
        AestheticScorer(CLIPVisionModelWithProjection(cfg), AestheticMLP())
