"""The node pack's ComfyUI-free logic on tiny inputs: conversions, choices, schedules, face encoding/scoring,
annotation and the IdGlow double-block patch. Runs without ComfyUI (``comfy`` is not importable here)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from comfy_helpers import pack_module
from idglow_core.adapter import AdapterConfig, IdGlowAdapter
from idglow_core.errors import ConfigError, IncompatibleAdapterError, InputError, NoFaceError
from idglow_core.faces import Face
from idglow_core.schedules import Schedule
from idglow_core.facesim import match_identities

convert = pack_module("_convert")
ops = pack_module("_ops")
sched = pack_module("_schedule")
patch = pack_module("patch")


# ---------------------------------------------------------------------------------------------- conversions
def test_image_batch_to_numpy_values_and_errors():
    images = torch.zeros(2, 3, 4, 3)
    images[1] = 0.5
    out = convert.image_batch_to_numpy(images)
    assert [a.shape for a in out] == [(3, 4, 3), (3, 4, 3)] and out[0].dtype == np.uint8
    assert out[0].max() == 0 and (out[1] == 128).all()  # round(0.5 * 255) = 128
    with pytest.raises(InputError, match="MASK or LATENT"):
        convert.image_batch_to_numpy(torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(InputError, match="IMAGE tensor"):
        convert.image_batch_to_numpy(np.zeros((1, 4, 4, 3)))


def test_numpy_to_image_batch_pads_centred_without_resizing():
    a = np.full((2, 2, 3), 255, np.uint8)
    b = np.zeros((4, 6, 3), np.uint8)
    out = convert.numpy_to_image_batch([a, b], pad_value=0.25)
    assert out.shape == (2, 4, 6, 3)
    assert torch.equal(out[0, 1:3, 2:4], torch.ones(2, 2, 3))  # centred: top 1, left 2
    assert out[0, 0, 0, 0] == 0.25 and out[1].max() == 0.0


def test_collect_references_keeps_order_and_requires_one():
    batch = torch.zeros(2, 4, 4, 3)
    batch[1] = 1.0
    extra = torch.full((1, 5, 7, 3), 0.2)
    refs = convert.collect_references(batch, [None, extra])
    assert [r.shape for r in refs] == [(4, 4, 3), (4, 4, 3), (5, 7, 3)]
    assert refs[1].min() == 255 and refs[2][0, 0, 0] == 51  # round(0.2 * 255) = 51
    with pytest.raises(InputError, match="No reference images"):
        convert.collect_references(None, [None, None])


def test_check_choice_and_parse_weights():
    convert.check_choice("face", "largest", ("largest", "index"))
    with pytest.raises(InputError, match="not one of"):
        convert.check_choice("face", "biggest", ("largest", "index"))
    assert convert.parse_weights("1, 0.5", 3) == [1.0, 0.5, 1.0]
    assert convert.parse_weights("", 2) == [1.0, 1.0]
    for bad, msg in (("1, x", "numbers"), ("1,1,1", "at most one"), ("-1", ">= 0")):
        with pytest.raises(InputError, match=msg):
            convert.parse_weights(bad, 2)


# ---------------------------------------------------------------------------------------------- schedules
def test_build_schedule_uses_only_the_presets_parameters():
    anneal = sched.build_schedule("anneal", 0.3, 0.1, 0.9, 5.0, 0.1, "junk")
    assert anneal.params == {"tau": 0.3}
    assert anneal(0.65) == pytest.approx(0.5)   # Eq. 4 by hand: (0.65 - 0.3) / (1 - 0.3) = 0.5
    assert anneal(0.2) == 0.0                   # Eq. 4: max(0, negative) = 0
    gate = sched.build_schedule("gate", 0.3, 0.3, 0.6, 1.0, 0.1, "")
    assert [gate(t) for t in (0.29, 0.3, 0.45, 0.6, 0.61)] == [0.0, 1.0, 1.0, 1.0, 0.0]  # Eq. 5, inclusive
    custom = sched.build_schedule("custom", 0.3, 0.3, 0.6, 1.0, 0.1, "1:0, 0.5:1, 0:0")
    assert custom(0.75) == pytest.approx(0.5) and custom(0.5) == pytest.approx(1.0)  # straight lines
    with pytest.raises(ConfigError, match="t:weight"):
        sched.build_schedule("custom", 0.3, 0.3, 0.6, 1.0, 0.1, "1-0")
    with pytest.raises(ConfigError, match="swap"):
        sched.build_schedule("gate", 0.3, 0.7, 0.4, 1.0, 0.1, "")
    with pytest.raises(ConfigError, match="Unknown schedule preset"):
        sched.build_schedule("cosine", 0.3, 0.3, 0.6, 1.0, 0.1, "")


def test_schedule_plot_is_an_rgb_picture_of_the_curve():
    img = sched.plot_array(Schedule("gate"))
    assert img.shape == (240, 480, 3) and img.dtype == np.uint8
    assert (img != 255).any(axis=2).mean() > 0.01  # axes and the curve are drawn


# ---------------------------------------------------------------------------------------------- faces
def _face(x: float, size: float, emb) -> Face:
    e = np.asarray(emb, np.float32)
    kps = np.array([[x + 0.3 * size, 30], [x + 0.7 * size, 30], [x + 0.5 * size, 45], [x + 0.35 * size, 60],
                    [x + 0.65 * size, 60]], np.float32)
    return Face(bbox=np.array([x, 10, x + size, 10 + size], np.float32), kps=kps, score=1.0,
                embedding=e / np.linalg.norm(e))


class FakeAnalyzer:
    """Returns preset faces per image (keyed by the image's first pixel value)."""

    name, embedding_dim = "fake", 3

    def __init__(self, faces_by_key):
        self.faces_by_key = faces_by_key

    def analyze(self, image):
        return self.faces_by_key[int(image[0, 0, 0])]


def _image(key: int, h: int = 100, w: int = 160) -> np.ndarray:
    img = np.full((h, w, 3), 90, np.uint8)
    img[0, 0, 0] = key
    return img


def test_encode_identities_picks_largest_or_index_and_crops():
    analyzer = FakeAnalyzer({1: [_face(0, 40, [1, 0, 0]), _face(60, 80, [0, 1, 0])], 2: [_face(10, 50, [0, 0, 2])]})
    steps = []
    ids = ops.encode_identities(analyzer, [_image(1), _image(2)], on_image=lambda: steps.append(1))
    assert torch.allclose(ids.embeddings, torch.tensor([[0.0, 1, 0], [0, 0, 1]]))  # largest face; unit rows
    assert ids.count == 2 and ids.dim == 3 and ids.backend == "fake" and len(steps) == 2
    assert [c.shape for c in ids.crops] == [(112, 112, 3)] * 2
    first = ops.encode_identities(analyzer, [_image(1)], face_index=0)
    assert torch.allclose(first.embeddings, torch.tensor([[1.0, 0, 0]]))
    with pytest.raises(NoFaceError, match="reference image 2 of 2"):
        ops.encode_identities(FakeAnalyzer({1: [_face(0, 40, [1, 0, 0])], 3: []}), [_image(1), _image(3)])
    with pytest.raises(InputError, match="Face index 5"):
        ops.encode_identities(analyzer, [_image(1)], face_index=5)


def test_score_images_matches_by_hand_and_annotates():
    refs = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    # image 1: ref 2's face on the left, ref 1's (cos 0.6) on the right; image 2: one face only (ref 1, cos 1)
    analyzer = FakeAnalyzer({1: [_face(0, 40, [0, 1, 0]), _face(60, 40, [0.6, 0, 0.8])], 2: [_face(5, 40, [1, 0, 0])]})
    summary = ops.score_images(analyzer, refs, [_image(1), _image(2)])
    assert list(summary.results[0].assignment) == [1, 0]
    assert summary.results[0].strict == pytest.approx((0.6 + 1.0) / 2)        # Eq. 2 matching, by hand
    assert summary.results[1].strict == pytest.approx(0.5)                     # missing ref 2 counts 0
    assert summary.strict == pytest.approx((0.8 + 0.5) / 2)
    assert summary.matched == pytest.approx((0.8 + 1.0) / 2)
    report = summary.report()
    assert "ref 1->face 2 (0.600)" in report and "ref 2->none" in report and "strict 0.6500" in report
    drawn = ops.annotate(_image(1), summary.faces[0], summary.results[0])
    assert tuple(drawn[50, 0]) == ops.PALETTE[1]      # left box edge: reference #2's colour
    assert tuple(drawn[50, 60]) == ops.PALETTE[0]     # right box edge: reference #1's colour
    with pytest.raises(InputError, match="same face analyzer"):
        ops.score_images(analyzer, torch.ones(1, 5), [_image(1)])


def test_dlib_identities_score_the_same_person_highest(data_dir):
    from idglow_core.faces import load_analyzer
    from idglow_core.images import load_image

    analyzer = load_analyzer("dlib")
    ids = ops.encode_identities(analyzer, [load_image(data_dir / "obama.jpg"), load_image(data_dir / "biden.jpg")])
    assert ids.embeddings.shape == (2, 128) and ids.backend == "dlib"
    summary = ops.score_images(analyzer, ids.embeddings, [load_image(data_dir / "obama2.jpg")])
    res = summary.results[0]
    assert list(res.assignment) == [0, -1]            # the one face is matched to reference 1 (Obama)
    assert res.matrix[0, 0] > res.matrix[1, 0] + 0.05


# ---------------------------------------------------------------------------------------------- the patch
def _adapter(blocks: int = 2, hidden: int = 16, seed: int = 0) -> IdGlowAdapter:
    torch.manual_seed(seed)
    adapter = IdGlowAdapter(AdapterConfig(hidden_dim=hidden, num_blocks=blocks, inner_dim=16, head_dim=8, token_dim=16,
                                          tokens_per_id=2, max_ids=4, id_dim=8))
    with torch.no_grad():
        for blk in adapter.blocks:  # a fresh adapter adds exactly 0; give it a non-zero output projection
            blk.to_out.weight.normal_(0, 0.5)
    return adapter.eval()


def _call(p, img, sigma, chunks=(0,), block=1, x_hw=(4, 6)):
    kw = {"img": img.clone(), "txt": torch.zeros(img.shape[0], 3, 16), "x": torch.zeros(img.shape[0], 16, 1, *x_hw),
          "block_index": block, "transformer_options": {"sigmas": torch.tensor([sigma]), "cond_or_uncond": list(chunks),
                                                        patch.BLOCK_CALLS: [block]}}  # blocks 0..block-1 ran before
    return p(kw)["img"]


def test_patch_changes_only_target_tokens_by_the_adapters_residual():
    adapter = _adapter()
    cond = adapter.condition(torch.randn(1, 2, 8), weight=0.7, schedule=Schedule("gate"))
    p = patch.IdGlowPatch(adapter, cond)
    img = torch.randn(2, 6 + 4, 16)  # 4x6 latent -> 2x3 = 6 target tokens, then 4 reference-latent tokens
    out = _call(p, img, 0.45, chunks=(1, 0))
    assert torch.equal(out[:, 6:], img[:, 6:])       # reference tokens untouched, bit for bit
    want = img[:, :6] + adapter.block_residual(1, img[:, :6], cond.tokens, cond.mask, torch.tensor([0.7, 0.7]))
    assert torch.allclose(out[:, :6], want) and not torch.allclose(out[:, :6], img[:, :6])
    assert torch.equal(_call(p, img, 0.7), img)       # outside the gate [0.3, 0.6]: Omega = 0, nothing added
    zero = patch.IdGlowPatch(adapter, adapter.condition(torch.randn(1, 2, 8), weight=0.0))
    assert torch.equal(_call(zero, img, 0.45), img)   # weight 0: bit-identical


def test_patch_positive_only_and_comfy_protocol():
    adapter = _adapter()
    cond = adapter.condition(torch.randn(1, 1, 8), weight=1.0, schedule=Schedule("constant"))
    marker = object()
    p = patch.IdGlowPatch(adapter, cond, apply_to="positive", adapter_patcher=marker)
    img = torch.randn(2, 6, 16)
    out = _call(p, img, 0.9, chunks=(1, 0))           # row 0 = negative (uncond), row 1 = positive
    assert torch.equal(out[0], img[0]) and not torch.allclose(out[1], img[1])
    assert copy.deepcopy(p) is p                      # ModelPatcher.clone() must not copy the adapter
    assert p.models() == [marker] and p.to(torch.device("cpu")) is p
    with pytest.raises(InputError, match="apply_to"):
        patch.IdGlowPatch(adapter, cond, apply_to="negative")


def test_target_tokens_and_adapter_fit():
    assert patch.target_token_count(torch.zeros(1, 16, 1, 7, 9)) == 4 * 5  # odd sizes are padded to 2x2 patches
    adapter = _adapter(blocks=2, hidden=16)

    class FakeDiT(torch.nn.Module):
        def __init__(self, width, blocks):
            super().__init__()
            self.inner_dim, self.transformer_blocks = width, torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))

    patch.check_adapter_fits(adapter, FakeDiT(16, 2))
    with pytest.raises(IncompatibleAdapterError, match="hidden width: adapter 16, model 32"):
        patch.check_adapter_fits(adapter, FakeDiT(32, 2))
    with pytest.raises(IncompatibleAdapterError, match="not a Qwen-Image DiT"):
        patch.check_adapter_fits(adapter, torch.nn.Linear(2, 2))


def test_positive_rows_come_from_the_positive_conds_uuids():
    """With the uuids that mark_positive records, 'positive' follows the prompt, wherever its chunk is; without
    them it falls back to KSampler's order (chunk 0 = positive)."""
    adapter = _adapter()
    p = patch.IdGlowPatch(adapter, adapter.condition(torch.randn(1, 1, 8), weight=0.5), apply_to="positive")
    to = {"sigmas": torch.tensor([0.5, 0.5]), "cond_or_uncond": [0, 1, 2], "uuids": ["neg", "mid", "pos"],
          patch.POSITIVE_UUIDS: {"pos"}}
    assert torch.equal(p.scales(to, 6), torch.tensor([0, 0, 0, 0, 0.5, 0.5]))  # 2 latents x 3 chunks, chunk-major
    del to[patch.POSITIVE_UUIDS]
    assert torch.equal(p.scales(to, 6), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))

    class Executor:  # what ComfyUI hands an OUTER_SAMPLE wrapper: class_obj = the guider
        class_obj = type("Guider", (), {"conds": {"positive": [{"uuid": "a"}, {"uuid": "b"}],
                                                  "negative": [{"uuid": "c"}]}, "model_options": {}})()

        def __call__(self, *args):
            return args

    ex = Executor()
    assert patch.mark_positive(ex, 1, 2) == (1, 2)
    assert ex.class_obj.model_options["transformer_options"][patch.POSITIVE_UUIDS] == {"a", "b"}


@pytest.mark.parametrize("model_dtype,adapter_dtype",
                         [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_patch_keeps_the_models_dtype_whatever_the_adapters(model_dtype, adapter_dtype):
    """ComfyUI runs the DiT in its compute dtype (bf16 for fp8/bf16 weights) while the adapter keeps its own:
    the stream keeps the model's dtype and the residual is the adapter's, rounded once."""
    adapter = _adapter().to(adapter_dtype)
    cond = adapter.condition(torch.randn(1, 2, 8).to(adapter_dtype), weight=1.0)
    img = torch.randn(1, 6 + 2, 16).to(model_dtype)
    out = _call(patch.IdGlowPatch(adapter, cond), img, 0.5)
    assert out.dtype == model_dtype and torch.equal(out[:, 6:], img[:, 6:])
    ref = adapter.float().block_residual(1, img[:, :6].float(), cond.tokens.float(), cond.mask, 1.0)
    assert torch.allclose((out[:, :6].float() - img[:, :6].float()), ref, atol=0.05, rtol=0.05)
    assert (out[:, :6] != img[:, :6]).any()


def test_annotation_labels_scale_with_the_image():
    """Labels are ~1/24 of the short side: readable when a 1024 px result is previewed at a few hundred px."""
    def label_height(scale: int) -> int:
        img = np.full((100 * scale, 160 * scale, 3), 90, np.uint8)
        face = _face(20 * scale, 60 * scale, [1, 0, 0])
        face = Face(bbox=face.bbox * 0 + np.array([20, 40, 80, 100], np.float32) * scale, kps=face.kps * scale,
                    score=1.0, embedding=face.embedding)
        res = match_identities(np.array([[1.0, 0, 0]]), face.embedding[None])
        drawn = ops.annotate(img, [face], res)
        column = drawn[: 40 * scale, 20 * scale + 1]            # the label box sits above the face box
        return int((np.abs(column.astype(int) - 90).sum(axis=1) > 0).sum())
    small, mid, large = label_height(1), label_height(4), label_height(8)
    assert small >= 12                   # never below a 12 px font
    assert large >= 30 and large > 1.6 * mid   # 800 px short side: a ~33 px font, growing with the image


def _forward_calls(p, indices, total=None, sigma=0.5):
    """Call the patch as one DiT forward would, once per entry of ``indices`` (the block_index ComfyUI reports)."""
    options = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
    for i in indices:
        if total is not None:
            options.update(total_blocks=total, block_index=i)
        p({"img": torch.randn(1, 6, 16), "txt": torch.zeros(1, 3, 16), "x": torch.zeros(1, 16, 1, 4, 6),
           "block_index": i, "transformer_options": options})
    return options


def test_patch_checks_the_block_index_against_its_own_call_count():
    adapter = _adapter(blocks=4)
    p = patch.IdGlowPatch(adapter, adapter.condition(torch.randn(1, 2, 8), weight=1.0, schedule=Schedule("constant")))
    options = _forward_calls(p, [0, 1, 2, 3], total=4)
    assert options[patch.BLOCK_CALLS] == [4]
    _forward_calls(p, [0, 1, 2, 3] * 2)                   # a transformer_options dict reused across forwards: fine
    # Flip-flop offloading that restarts block_index at 0 for the offloaded half: block 0's weights on block 2.
    with pytest.raises(patch.BlockIndexError, match="block_index 0 where block 2 runs"):
        _forward_calls(p, [0, 1, 0, 1], total=4)
    with pytest.raises(patch.BlockIndexError, match="runs 6 dual-stream blocks but the IdGlow adapter has 4"):
        _forward_calls(p, [0], total=6)
    options = {"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0], "block_index": 2}
    with pytest.raises(patch.BlockIndexError, match="block_index 1 to the patch but transformer_options says 2"):
        p({"img": torch.randn(1, 6, 16), "txt": torch.zeros(1, 3, 16), "x": torch.zeros(1, 16, 1, 4, 6),
           "block_index": 1, "transformer_options": options})
    silent = patch.IdGlowPatch(adapter, adapter.condition(torch.randn(1, 2, 8), weight=0.0))
    with pytest.raises(patch.BlockIndexError):            # checked even where nothing is injected
        _forward_calls(silent, [0, 1, 0, 1], total=4)
