"""Identity without an adapter in the library: seed search (step accounting, M = N equals plain sampling) and
identity guidance (bit-identical when off, lower final ID loss when on, no gradient into the DiT)."""
from __future__ import annotations

import pytest
import torch

from idglow_core.errors import ConfigError, ModelNotFoundError
from idglow_core.guidance import GuidanceConfig, IdentityGuidance, arcface_for, guidance_references
from idglow_core.pipeline import GenerateConfig, IdGlowPipeline
from idglow_core.schedules import Schedule
from idglow_core.seedsearch import split_step, step_accounting
from idglow_core.testing import OneFaceAnalyzer, small_edit_images
from idglow_core.training.identity import IdentityLoss, analyzer_detector, tiny_arcface

FAST = dict(steps=4, height=32, width=32, output_type="pt", negative_prompt=None)  # sigmas 1, .74, .42, .02


class RowCounter:
    """Counts sample-steps: rows of the latent batch through each DiT call (CFG off: one call per step)."""

    def __init__(self, transformer):
        self.rows = 0
        self.handle = transformer.register_forward_hook(self)

    def __call__(self, module, args, kwargs_or_out, out=None):
        self.rows += int(module._last_rows)

    @staticmethod
    def install(transformer):
        def pre(module, args, kwargs):
            module._last_rows = kwargs["hidden_states"].shape[0]
        h1 = transformer.register_forward_pre_hook(pre, with_kwargs=True)
        counter = RowCounter(transformer)
        return counter, h1


# ------------------------------------------------------------------------------------------- step accounting
def test_split_step_and_accounting_by_hand():
    # Qwen-style shift 3.1 on 8 steps: most steps lie above t = 0.5
    sigmas = [1.0, 0.9716, 0.9357, 0.8886, 0.8238, 0.7288, 0.5781, 0.3150, 0.0]
    assert split_step(sigmas, 0.5) == 8          # the first sigma <= 0.5 is step 8's (0.315)
    assert split_step(sigmas, 0.8) == 6          # 0.7288 at step index 5 -> 6 steps for everyone
    assert split_step([1.0, 0.75, 0.5, 0.25, 0.0], 0.5) == 3
    assert split_step([1.0, 0.75, 0.5, 0.25], 0.1) == 4   # never reached: no pruning
    acc = step_accounting(8, 2, 8, 4)
    assert (acc["pruned_steps"], acc["full_steps"], acc["ratio"]) == (40, 64, 0.625)
    with pytest.raises(ConfigError, match="flow time"):
        split_step(sigmas, 1.5)
    with pytest.raises(ConfigError, match="keep <= candidates"):
        GenerateConfig(candidates=2, keep=3)


def test_pruned_search_runs_n_k_plus_m_rest_and_keeps_the_best_estimates(pipe, refs):
    ip = IdGlowPipeline(pipe, None, OneFaceAnalyzer())
    counter, pre = RowCounter.install(pipe.transformer)
    try:
        result = ip(refs, GenerateConfig(seed=3, candidates=3, keep=1, prune_at=0.5, **FAST))
        rows = counter.rows
    finally:
        counter.handle.remove()
        pre.remove()
    meta = result.metadata["training_free"]
    acc = meta["accounting"]
    assert acc["split_step"] == 3 and acc["t_at_split"] == pytest.approx(0.42481, abs=1e-4)
    assert rows == acc["pruned_steps"] == 3 * 3 + 1 * 1
    assert [e["rows"] for e in meta["steps_log"]] == [3, 3, 3, 1]
    assert all(e["seconds"] >= 0 for e in meta["steps_log"])
    assert result.images.shape == (1, 3, 32, 32)
    ranking = meta["ranking"]
    assert len(ranking) == 3 and meta["kept_seeds"] == [3 + ranking[0]["index"]]


def test_keep_all_equals_plain_sampling_of_each_seed(pipe, refs):
    """M = N through the split (phase 1 to step k, phase 2 from the latents with the sigma tail) gives each seed's
    plain single run, best first."""
    ip = IdGlowPipeline(pipe, None, OneFaceAnalyzer())
    plain = {s: ip(refs, GenerateConfig(seed=s, **FAST)).images[0] for s in (5, 6, 7)}
    result = ip(refs, GenerateConfig(seed=5, candidates=3, keep=3, prune_at=0.5, **FAST))
    assert result.metadata["training_free"]["accounting"]["split_step"] == 3
    kept = result.metadata["training_free"]["kept_seeds"]
    assert sorted(kept) == [5, 6, 7]
    for image, seed in zip(result.images, kept):
        assert torch.allclose(image, plain[seed], atol=1e-5), (seed, (image - plain[seed]).abs().max())
    full = ip(refs, GenerateConfig(seed=5, candidates=3, keep=2, **FAST))  # full best-of-N: no prune_at
    assert full.metadata["training_free"]["accounting"]["pruned_steps"] == 12
    for image, seed in zip(full.images, full.metadata["training_free"]["kept_seeds"]):
        assert torch.allclose(image, plain[seed], atol=1e-5)


def test_sequential_candidates_give_the_batched_images_one_row_per_call(pipe, refs):
    """sequential=True (one candidate per call, as the IdGlowSeedSearch node): the same images, ranking and
    sample-steps as the batched search, every DiT call of batch 1, and the references VAE-encoded once per search."""
    ip = IdGlowPipeline(pipe, None, OneFaceAnalyzer())
    counter, pre = RowCounter.install(pipe.transformer)
    encodes = []
    vae_hook = pipe.vae.encoder.register_forward_hook(lambda m, a, out: encodes.append(a[0].shape[0]))
    try:
        for prune_at in (0.5, None):
            runs = {}
            for sequential in (False, True):
                counter.rows, encodes[:] = 0, []
                cfg = GenerateConfig(seed=4, candidates=3, keep=2, prune_at=prune_at, sequential=sequential, **FAST)
                runs[sequential] = (ip(refs, cfg), counter.rows, len(encodes))
            (batched, rows_b, enc_b), (seq, rows_s, enc_s) = runs[False], runs[True]
            mb, ms = batched.metadata["training_free"], seq.metadata["training_free"]
            assert ms["sequential"] and not mb["sequential"]
            assert ms["kept_seeds"] == mb["kept_seeds"]
            assert [r["index"] for r in ms["ranking"]] == [r["index"] for r in mb["ranking"]]
            for a, b in zip(ms["ranking"], mb["ranking"]):         # batched matmuls round differently (~1e-6)
                assert a["facesim_strict"] == pytest.approx(b["facesim_strict"], abs=1e-4)
            assert torch.allclose(seq.images, batched.images, atol=1e-5), (seq.images - batched.images).abs().max()
            expected = 3 * 3 + 2 * 1 if prune_at else 3 * 4
            assert rows_s == rows_b == ms["accounting"]["pruned_steps"] == expected
            assert [e["rows"] for e in ms["steps_log"]] == [1] * expected
            assert enc_s == enc_b == len(refs)        # cached: not once per call
    finally:
        counter.handle.remove()
        pre.remove()
        vae_hook.remove()


# ------------------------------------------------------------------------------------------- identity guidance
@pytest.fixture(scope="module")
def arcface():
    return tiny_arcface()


def _final_loss(images, refs, arcface):
    detect = analyzer_detector(OneFaceAnalyzer())
    emb = guidance_references(refs, detect, arcface)
    return IdentityLoss(detect, arcface)(images, [emb] * images.shape[0]).loss


def test_guidance_off_is_bit_identical(pipe, refs, arcface):
    ip = IdGlowPipeline(pipe, None, OneFaceAnalyzer(), arcface=arcface)
    plain = ip(refs, GenerateConfig(seed=1, **FAST)).images
    zero = ip(refs, GenerateConfig(seed=1, id_guidance=GuidanceConfig(strength=0.0), **FAST))
    closed = ip(refs, GenerateConfig(seed=1, id_guidance=GuidanceConfig(strength=5.0, schedule="none"), **FAST))
    assert torch.equal(zero.images, plain) and torch.equal(closed.images, plain)
    assert zero.metadata["training_free"]["guidance"]["steps"] == []


def test_guidance_lowers_the_final_id_loss_and_never_touches_the_dit(pipe, refs, arcface):
    ip = IdGlowPipeline(pipe, None, OneFaceAnalyzer(), arcface=arcface)
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_grad_enabled(), out[0].requires_grad)))
    try:
        plain = ip(refs, GenerateConfig(seed=2, **FAST)).images
        window = Schedule("gate", {"lo": 0.4, "hi": 0.8})   # steps at t = .74 and .42 only
        guided = ip(refs, GenerateConfig(seed=2, id_guidance=GuidanceConfig(strength=3.0, schedule=window), **FAST))
    finally:
        hook.remove()
    steps = guided.metadata["training_free"]["guidance"]["steps"]
    assert [round(s["t"], 2) for s in steps] == [0.74, 0.42]
    assert all(s["faces"] == [1] and len(s["loss"]) == 1 for s in steps)
    before, after = float(_final_loss(plain, refs, arcface)), float(_final_loss(guided.images, refs, arcface))
    assert after < before - 1e-3, (before, after)
    assert seen and not any(grad or req for grad, req in seen)       # the DiT ran without autograd every time
    assert all(p.grad is None for p in pipe.transformer.parameters())
    logged = [e for e in guided.metadata["training_free"]["steps_log"] if "id_loss" in e]
    assert [e["step"] for e in logged] == [1, 2]


def test_the_guidance_gradient_has_no_path_into_the_dit(pipe, arcface):
    """The loss is built on a detached estimate: asking autograd for DiT gradients finds none."""
    from idglow_core.training.sft import vae_decoder
    detect = analyzer_detector(OneFaceAnalyzer())
    x = torch.randn(1, 64, 16)
    out = pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 5, 16),
                           encoder_hidden_states_mask=torch.ones(1, 5), img_shapes=[[(1, 8, 8)]],
                           return_dict=False)[0]                       # graph into the DiT (grad enabled here)
    x0 = pipe._unpack_latents(x - 0.5 * out, 64, 64, pipe.vae_scale_factor)  # 8x8 patches
    guidance = IdentityGuidance(torch.nn.functional.normalize(torch.randn(1, 32), dim=-1), vae_decoder(pipe.vae),
                                detect, arcface, GuidanceConfig(strength=1.0), Schedule("constant"))
    loss, _, z = guidance.loss(x0)
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss.sum(), [z, *params], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])
    moved = guidance(x0.detach(), 0.5)
    assert torch.linalg.vector_norm(moved - x0.detach()).item() == pytest.approx(1.0, rel=1e-4)  # unit step


def test_guidance_with_dlib_says_it_needs_the_arcface_onnx(pipe, refs):
    from idglow_core.faces import load_analyzer
    ip = IdGlowPipeline(pipe, None, load_analyzer("dlib"))
    with pytest.raises(ModelNotFoundError, match="w600k_r50.onnx"):
        ip(refs, GenerateConfig(seed=0, id_guidance=GuidanceConfig(), **FAST))
    with pytest.raises(ModelNotFoundError, match="dlib"):
        arcface_for(load_analyzer("dlib"))
    with pytest.raises(ConfigError, match="strength"):
        GuidanceConfig(strength=-1)


def test_arcface_for_reads_the_insightface_folder(tmp_path):
    from idglow_core.faces.testing import write_tiny_buffalo
    folder = write_tiny_buffalo(tmp_path / "buffalo_l")

    class Analyzer:
        name, folder = "insightface", None

    a = Analyzer()
    a.folder = folder
    arc = arcface_for(a)
    assert arc(torch.rand(2, 3, 112, 112)).shape == (2, 512)


def test_cli_generate_best_of_n_without_an_adapter(pipe, data_dir, tmp_path):
    import json

    from PIL import Image

    from idglow_core.cli import main
    from idglow_core.testing import save_tiny_pipeline
    model = save_tiny_pipeline(pipe, tmp_path / "model")
    out = tmp_path / "out" / "group.png"
    refs = [str(data_dir / "obama.jpg"), str(data_dir / "biden.jpg")]
    with small_edit_images():
        rc = main(["generate", "--model", str(model), "--refs", *refs, "--out", str(out), "--seed", "4",
                   "--steps", "4", "--height", "32", "--width", "32", "--device", "cpu", "--face-backend", "dlib",
                   "--candidates", "3", "--keep", "2", "--prune-at", "0.5"])
    assert rc == 0
    assert Image.open(out).size == (32, 32) and Image.open(out.with_name("group-2.png")).size == (32, 32)
    meta = json.loads(out.with_suffix(".json").read_text())
    search = meta["training_free"]
    assert search["accounting"]["pruned_steps"] == 3 * 3 + 2 * 1 and len(search["ranking"]) == 3
    assert len(search["kept_seeds"]) == 2 and set(search["kept_seeds"]) <= {4, 5, 6}
    assert "adapter" not in meta and meta["images"][1].endswith("group-2.png")
    with small_edit_images():
        rc = main(["generate", "--model", str(model), "--refs", *refs, "--out", str(out), "--device", "cpu",
                   "--face-backend", "dlib", "--id-guidance", "1.0", "--steps", "2", "--height", "32",
                   "--width", "32"])
    assert rc == 2   # dlib has no differentiable recogniser: a typed error, exit code 2
