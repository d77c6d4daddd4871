"""Identity without an adapter in real ComfyUI (``COMFYUI_DIR``; skipped with a printed reason when unset): seed search
with ComfyUI's own sampling, Select Best, and identity guidance as a post-CFG function with KSampler."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import comfy_helpers as ch
from idglow_core.testing import OneFaceAnalyzer


@pytest.fixture(scope="module")
def env():
    return ch.boot_comfy()


@pytest.fixture(scope="module")
def tiny(env):
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():            # as ComfyUI's executor runs the loader nodes
        vae = ch.build_tiny_vae()
    return {"model": ch.build_tiny_qwen(), "vae": vae,
            "positive": [[torch.randn(1, 7, 64, generator=gen), {}]], "negative": [[torch.zeros(1, 7, 64), {}]]}


def _ids(dim: int, backend: str, k: int = 2):
    ops = ch.pack_submodule("nodes._ops")
    return ops.IdentitySet(torch.nn.functional.normalize(torch.randn(k, dim), dim=-1), backend=backend)


class StepCounter:
    """DIFFUSION_MODEL wrapper: sample-steps = latent rows per DiT call (cfg 1: one chunk per call)."""

    def __init__(self):
        self.rows = 0

    def __call__(self, executor, x, *args, **kwargs):
        self.rows += x.shape[0]
        return executor(x, *args, **kwargs)


def _ksampler(env, model, tiny, seed, steps=6, cfg=1.0):
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    return env["nodes"].common_ksampler(model, seed, steps, cfg, "euler", "simple", tiny["positive"],
                                        tiny["negative"], latent)[0]["samples"]


def test_new_nodes_are_registered(env):
    assert {"IdGlowSelectBest", "IdGlowSeedSearch", "IdGlowIdentityGuidance"} <= set(env["new_nodes"])


def test_seed_search_step_accounting_and_keep_all_equals_ksampler(env, tiny):
    import comfy.patcher_extension
    node = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowSeedSearch"]
    counter = StepCounter()
    model = tiny["model"].clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count", counter)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    ids = _ids(8, "stub")
    out = node.execute(model, tiny["positive"], tiny["negative"], latent, tiny["vae"], ids, OneFaceAnalyzer(),
                       10, 3, 1, 0.5, 6, 1.0, "euler", "simple")
    report, best_seed = out[1], out[2]
    first = report.splitlines()[0]
    # native Qwen sampling (flux shift 1.15): sigmas 1, .94, .86, .76, .61, .39 -> t_p = 0.5 is step 6 of 6
    search = ch.pack_submodule("nodes.search_nodes")
    _, _, ranking, acc = search.seed_search(model, tiny["positive"], tiny["negative"], latent, tiny["vae"], ids,
                                            OneFaceAnalyzer(), 10, 3, 1, 0.8, 6, 1.0, "euler", "simple")
    assert first.startswith("t_p = 0.5 is step 6 of 6")
    assert acc["split_step"] == 4 and acc["t_at_split"] == pytest.approx(0.7595, abs=1e-3)
    assert counter.rows == 3 * 6 + (3 * 4 + 1 * 2)            # first run: k = steps; second: N*k + M*(steps-k)
    assert acc["pruned_steps"] == 3 * 4 + 1 * 2 and best_seed in (10, 11, 12)
    assert [r["seed"] for r in ranking] == sorted([10, 11, 12], key=[r["seed"] for r in ranking].index)
    # M = N: each finished latent is the plain KSampler result of its seed
    finished, _, ranking, acc = search.seed_search(tiny["model"], tiny["positive"], tiny["negative"], latent,
                                                   tiny["vae"], ids, OneFaceAnalyzer(), 20, 3, 3, 0.8, 6, 1.0,
                                                   "euler", "simple")
    assert acc["split_step"] == 4 and finished["samples"].shape[0] == 3
    for row, entry in zip(finished["samples"], ranking):
        plain = _ksampler(env, tiny["model"], tiny, entry["seed"])[0]
        assert torch.allclose(row, plain, atol=1e-5), (entry["seed"], (row - plain).abs().max())


def test_select_best_ranks_a_batch(env):
    node = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowSelectBest"]
    analyzer = OneFaceAnalyzer()
    images = torch.stack([torch.full((32, 32, 3), v) for v in (0.1, 0.5, 0.9)])
    target = analyzer.analyze((images[1].numpy() * 255).round().astype(np.uint8))[0].embedding
    ops = ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(torch.from_numpy(target[None]), backend="stub")
    best, scores, report = node.execute(images, ids, analyzer, 2)[:3]
    assert torch.equal(best[0], images[1]) and best.shape[0] == 2
    parsed = json.loads(scores)
    assert [s["index"] for s in parsed][0] == 1 and parsed[0]["facesim_strict"] == pytest.approx(1.0, abs=1e-6)
    assert report.splitlines()[0].startswith("#1: image 2, 1 face(s) for 1 reference(s)")


class StandInInsightFace(OneFaceAnalyzer):
    """Fixed centred keypoints (no gradient) + the tiny buffalo_l folder for the differentiable ArcFace."""

    name, embedding_dim = "insightface", 512

    def __init__(self, folder):
        self.folder = folder


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    from idglow_core.faces.testing import write_tiny_buffalo
    return write_tiny_buffalo(tmp_path_factory.mktemp("buffalo") / "buffalo_l")


def _final_id_loss(tiny, latent, ids, analyzer):
    from idglow_core.guidance import arcface_for
    from idglow_core.training.identity import IdentityLoss, analyzer_detector
    with torch.no_grad():
        pixels = tiny["vae"].decode(latent).reshape(-1, 64, 64, 3).permute(0, 3, 1, 2)
        loss = IdentityLoss(analyzer_detector(analyzer), arcface_for(analyzer))
        return float(loss(pixels, [ids.embeddings] * pixels.shape[0]).loss.mean())


def test_identity_guidance_in_ksampler(env, tiny, buffalo):
    from idglow_core.schedules import Schedule
    node = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowIdentityGuidance"]
    analyzer, ids = StandInInsightFace(buffalo), _ids(512, "insightface")
    plain = _ksampler(env, tiny["model"], tiny, 3, cfg=2.0)
    zero = node.execute(tiny["model"], tiny["vae"], ids, analyzer, 0.0, 4)[0]
    closed = node.execute(tiny["model"], tiny["vae"], ids, analyzer, 5.0, 4, Schedule("none"))[0]
    with torch.inference_mode():                              # as ComfyUI's executor samples
        assert torch.equal(_ksampler(env, zero, tiny, 3, cfg=2.0), plain)
        assert torch.equal(_ksampler(env, closed, tiny, 3, cfg=2.0), plain)
    guided_model = node.execute(tiny["model"], tiny["vae"], ids, analyzer, 4.0, 4, Schedule("gate", {"lo": 0.5,
                                                                                                     "hi": 0.9}))[0]
    fn = guided_model.model_options["sampler_post_cfg_function"][0]
    with torch.inference_mode():
        guided = _ksampler(env, guided_model, tiny, 3, cfg=2.0)
    steps = fn.core.records
    assert [round(r.t, 2) for r in steps] == [0.86, 0.76, 0.61]   # the sigmas inside [0.5, 0.9]
    assert all(r.faces == [1] for r in steps)
    before, after = _final_id_loss(tiny, plain, ids, analyzer), _final_id_loss(tiny, guided, ids, analyzer)
    assert after < before - 1e-4, (before, after)
    dit = tiny["model"].get_model_object("diffusion_model")
    assert all(p.grad is None for p in dit.parameters())
    assert "sampler_post_cfg_function" not in tiny["model"].model_options   # the input MODEL is untouched


def test_identity_guidance_with_dlib_is_a_typed_error(env, tiny):
    from idglow_core.errors import ModelNotFoundError
    from idglow_core.faces import load_analyzer
    node = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowIdentityGuidance"]
    with pytest.raises(ModelNotFoundError, match="w600k_r50.onnx"):
        node.execute(tiny["model"], tiny["vae"], _ids(128, "dlib"), load_analyzer("dlib"), 1.0, 4)
