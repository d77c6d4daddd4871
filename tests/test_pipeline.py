"""IdGlowPipeline and the generate CLI on the tiny offline Qwen-Image-Edit-Plus stack."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from idglow_core.adapter import IdGlowAdapter
from idglow_core.errors import IncompatibleAdapterError, InputError, ModelNotFoundError
from idglow_core.faces.base import Face
from idglow_core.pipeline import GenerateConfig, IdGlowPipeline, load_edit_pipeline
from idglow_core.schedules import omega
from idglow_core.testing import random_embeddings, save_tiny_pipeline, small_edit_images

FAST = dict(steps=4, height=32, width=32, output_type="pt", negative_prompt=None)  # sigmas ~1, .74, .42, .02


def _trained(adapter: IdGlowAdapter) -> IdGlowAdapter:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in adapter.blocks:
            blk.to_out.weight.copy_(torch.randn(blk.to_out.weight.shape, generator=g) * 0.2)
    return adapter


def _base(pipe, refs, cfg: GenerateConfig, prompt: str) -> torch.Tensor:
    return pipe(image=[Image.fromarray(r) for r in refs], prompt=prompt, negative_prompt=cfg.negative_prompt,
                true_cfg_scale=cfg.true_cfg_scale, num_inference_steps=cfg.steps, height=cfg.height,
                width=cfg.width, generator=torch.Generator().manual_seed(cfg.seed), output_type="pt").images


def test_init_and_weight_zero_are_bit_identical_to_the_base_pipeline(pipe, refs):
    emb = random_embeddings(2)
    with_cfg = {**FAST, "negative_prompt": " "}  # true CFG: two transformer calls per step
    cfg = GenerateConfig(task="group", **with_cfg)
    fresh = IdGlowPipeline(pipe, IdGlowAdapter.init_for(pipe.transformer))(refs, cfg, embeddings=emb)
    base = _base(pipe, refs, cfg, fresh.metadata["prompt"])
    assert torch.equal(fresh.images, base)
    trained = IdGlowPipeline(pipe, _trained(IdGlowAdapter.init_for(pipe.transformer)))
    zero = trained(refs, GenerateConfig(task="group", weight=0.0, **with_cfg), embeddings=emb)
    assert torch.equal(zero.images, base)
    active = trained(refs, cfg, embeddings=emb)
    assert (active.images - base).abs().max() > 1e-4
    again = trained(refs, cfg, embeddings=emb)
    assert torch.equal(again.images, active.images)                     # seedable
    other = trained(refs, GenerateConfig(task="group", seed=1, **with_cfg), embeddings=emb)
    assert not torch.equal(other.images, active.images)


@pytest.mark.parametrize("task,schedule", [("age", None), ("group", None), ("group", "smooth_gate")])
def test_injection_happens_exactly_where_the_schedule_is_nonzero(pipe, refs, task, schedule):
    ip = IdGlowPipeline(pipe, _trained(IdGlowAdapter.init_for(pipe.transformer)))
    events: list = []
    original = ip.adapter.block_residual

    def recording(block_index, img, tokens, mask, scale, token_weights=None):
        events.append(("inject", block_index, scale.clone()))
        return original(block_index, img, tokens, mask, scale, token_weights)

    ip.adapter.block_residual = recording
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: events.append(("step", float(kw["timestep"][0]))), with_kwargs=True)
    try:
        result = ip(refs, GenerateConfig(task=task, weight=0.8, schedule=schedule, **FAST),
                    embeddings=random_embeddings(2))
    finally:
        hook.remove()
    sched = result.metadata["schedule"]
    steps: list[tuple[float, list]] = []
    for e in events:
        if e[0] == "step":
            steps.append((e[1], []))
        else:
            steps[-1][1].append(e)
    ts = [t for t, _ in steps]
    assert len(steps) == 4
    want = [omega(sched["name"], t, **sched["params"]) for t in ts]
    assert any(w == 0 for w in want) and any(w > 0 for w in want), ts   # the test covers both cases
    for (t, injections), w in zip(steps, want):
        if w == 0:
            assert injections == [], t
        else:
            assert [i[1] for i in injections] == [0, 1], t                 # every block, once
            assert all(torch.allclose(i[2], torch.tensor([0.8 * w])) for i in injections), t
    if task == "age" and schedule is None:
        assert all((0.3 <= t <= 0.6) == bool(inj) for t, inj in steps)


def test_omega_sees_the_noise_level_of_the_latents_after_the_resolution_shift(pipe, refs):
    """The adapter evaluates Omega on the transformer's ``timestep`` = scheduler timestep / 1000 = the step's
    sigma after the resolution shift, i.e. the t of ``z_t = (1 - t) z0 + t eps`` the scheduler integrates, the
    same t the trainer samples and feeds (training.packing.edit_inputs)."""
    adapter = _trained(IdGlowAdapter.init_for(pipe.transformer))
    cond = adapter.condition(random_embeddings(2)[None], schedule="gate")
    seen, sigmas = [], []
    original = cond.scale
    cond.scale = lambda sigma: (seen.append(sigma.tolist()), original(sigma))[1]

    def on_step(p, i, t, kw):
        sigmas.append(float(p.scheduler.sigmas[i]))  # the sigma this step's Euler update starts from
        return {}

    with adapter.attach(pipe.transformer):
        pipe(image=[Image.fromarray(r) for r in refs], prompt="x", num_inference_steps=4, height=64, width=64,
             output_type="pt", attention_kwargs={"idglow": cond}, callback_on_step_end=on_step)
    assert len(seen) == 4 and [s[0] for s in seen] == pytest.approx(sigmas, abs=1e-6)
    unshifted = [1.0, 0.75, 0.5, 0.25]  # np.linspace(1, 1/4, 4): what the scheduler gets before its shift
    assert max(abs(a - b) for a, b in zip(sigmas, unshifted)) > 0.05 and sigmas[-1] == pytest.approx(0.02)


def test_metadata_and_per_identity_weights(pipe, refs):
    ip = IdGlowPipeline(pipe, _trained(IdGlowAdapter.init_for(pipe.transformer)))
    cfg = GenerateConfig(task="age", id_weights=[1.0, 0.5], **FAST)
    r = ip(refs, cfg, embeddings=random_embeddings(2))
    assert r.metadata["schedule"] == {"name": "gate", "params": {"lo": 0.3, "hi": 0.6}}
    assert r.metadata["id_weights"] == [1.0, 0.5] and r.metadata["task"] == "age"
    assert "as young children" in r.metadata["prompt"] and "Picture 2" in r.metadata["prompt"]
    same = ip(refs, GenerateConfig(task="age", **FAST), embeddings=random_embeddings(2))
    assert not torch.equal(r.images, same.images)
    with pytest.raises(InputError, match="one weight per reference"):
        ip(refs, GenerateConfig(id_weights=[1.0], **FAST), embeddings=random_embeddings(2))
    with pytest.raises(InputError, match="at most 4"):
        ip(refs * 3, GenerateConfig(**FAST), embeddings=random_embeddings(6))
    with pytest.raises(IncompatibleAdapterError, match="dlib backend gives 128-d"):
        ip(refs, GenerateConfig(**FAST), embeddings=random_embeddings(2, dim=128))
    with pytest.raises(InputError, match="No face analyzer"):
        ip(refs, GenerateConfig(**FAST))


def test_deploying_another_schedule_than_trained_warns(pipe, refs, caplog):
    """An adapter trained with the group anneal injection: the group preset is silent, another schedule or a
    task it was not trained with logs a warning (it would run at another strength than it learnt)."""
    import logging

    adapter = _trained(IdGlowAdapter.init_for(pipe.transformer))
    adapter.trained_injection = {"group": "anneal(tau=0.3)"}
    ip = IdGlowPipeline(pipe, adapter)
    caplog.set_level(logging.WARNING, logger="idglow")
    ip(refs, GenerateConfig(task="group", **FAST), embeddings=random_embeddings(2))
    assert "trained with" not in caplog.text
    ip(refs, GenerateConfig(task="group", schedule="constant", **FAST), embeddings=random_embeddings(2))
    assert "injecting with schedule" in caplog.text and "trained with group" in caplog.text
    caplog.clear()
    ip(refs, GenerateConfig(task="age", **FAST), embeddings=random_embeddings(2))
    assert "for task 'age'" in caplog.text


class FakeAnalyzer:
    """A face backend stand-in: one face per image, embedding from the image's mean colour."""

    name, embedding_dim = "fake", 512

    def analyze(self, image):
        e = np.full(512, float(image.mean()) + 1.0, dtype=np.float32)
        return [Face(np.array([1, 2, 30, 35], np.float32), np.zeros((5, 2), np.float32), 0.9, e / np.linalg.norm(e))]


def test_faces_come_from_the_analyzer_and_dims_are_checked(pipe, refs):
    ip = IdGlowPipeline(pipe, IdGlowAdapter.init_for(pipe.transformer), analyzer=FakeAnalyzer())
    r = ip(refs, GenerateConfig(**FAST))
    assert r.metadata["faces"] == [{"source": "fake", "bbox": [1.0, 2.0, 30.0, 35.0], "score": 0.9}] * 2
    small = FakeAnalyzer()
    small.name, small.embedding_dim = "dlib", 128
    with pytest.raises(IncompatibleAdapterError, match="'dlib' face backend gives 128-d"):
        IdGlowPipeline(pipe, IdGlowAdapter.init_for(pipe.transformer), analyzer=small)(refs, GenerateConfig(**FAST))


def test_precomputed_embeddings_from_a_torch_encoder_are_accepted(pipe, refs):
    """Embeddings straight from a torch face encoder (bf16, still attached to a graph) give the same image as
    their float32 numpy copy; a wrong shape is a typed error."""
    ip = IdGlowPipeline(pipe, _trained(IdGlowAdapter.init_for(pipe.transformer)))
    emb = random_embeddings(2).to(torch.bfloat16)
    want = ip(refs, GenerateConfig(**FAST), embeddings=emb.float().numpy()).images
    graph = emb.float().requires_grad_(True) * 1.0
    assert torch.equal(ip(refs, GenerateConfig(**FAST), embeddings=graph).images, want)
    assert torch.equal(ip(refs, GenerateConfig(**FAST), embeddings=emb).images, want)
    with pytest.raises(InputError, match="2 references"):
        ip(refs, GenerateConfig(**FAST), embeddings=emb[:1])


def test_loading_errors_are_typed(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json missing"):
        load_edit_pipeline(tmp_path / "nothing")
    with pytest.raises(ModelNotFoundError, match="offline"):  # HF_HUB_OFFLINE=1 (conftest): never downloads
        load_edit_pipeline("idglow-test/not-a-cached-model")
    with pytest.raises(ModelNotFoundError):
        IdGlowPipeline.from_pretrained(tmp_path, tmp_path / "missing.safetensors")


def test_cli_generate_from_saved_folders(pipe, refs, tmp_path):
    from idglow_core.cli import main

    model = save_tiny_pipeline(pipe, tmp_path / "model")
    adapter = _trained(IdGlowAdapter.init_for(pipe.transformer)).save(tmp_path / "idglow.safetensors")
    paths = []
    for i, r in enumerate(refs):
        paths.append(tmp_path / f"ref{i}.png")
        Image.fromarray(r).save(paths[-1])
    np.save(tmp_path / "emb.npy", random_embeddings(2).numpy())
    out = tmp_path / "out" / "group.png"
    with small_edit_images():
        rc = main(["generate", "--model", str(model), "--adapter", str(adapter), "--refs", *map(str, paths),
                   "--task", "age", "--out", str(out), "--seed", "3", "--steps", "2", "--height", "32",
                   "--width", "32", "--embeddings", str(tmp_path / "emb.npy"), "--device", "cpu"])
    assert rc == 0
    assert Image.open(out).size == (32, 32)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["schedule"]["name"] == "gate" and meta["seed"] == 3 and meta["steps"] == 2
    assert meta["refs"] == [str(p) for p in paths]
    rc = main(["generate", "--model", str(tmp_path / "absent"), "--adapter", str(adapter), "--refs", str(paths[0]),
               "--out", str(out), "--embeddings", str(tmp_path / "emb.npy")])
    assert rc == 2  # a typed error becomes exit code 2 with the message on stderr


def test_real_photos_through_the_dlib_backend(pipe, data_dir):
    pytest.importorskip("dlib")
    from idglow_core.faces import load_analyzer

    adapter = _trained(IdGlowAdapter.init_for(pipe.transformer, id_dim=128))  # an adapter trained on dlib
    ip = IdGlowPipeline(pipe, adapter, analyzer=load_analyzer("dlib"))
    photos = [data_dir / "obama.jpg", data_dir / "biden.jpg"]
    r = ip(photos, GenerateConfig(task="group", **FAST))
    assert [f["source"] for f in r.metadata["faces"]] == ["dlib", "dlib"]
    x1, y1, x2, y2 = r.metadata["faces"][0]["bbox"]
    assert 40 < x2 - x1 < 200 and 40 < y2 - y1 < 200   # a face-sized box on the 400 px photo
    off = ip(photos, GenerateConfig(task="group", weight=0.0, **FAST))
    assert not torch.equal(r.images, off.images)       # the detected identities reach the model


def test_non_finite_or_misshapen_options_are_refused_before_any_model_loads(tmp_path, capsys):
    from idglow_core.cli import main

    for bad in (dict(weight=float("nan")), dict(true_cfg_scale=float("inf")), dict(id_weights=[1.0, float("nan")]),
                dict(id_weights="0.5 1.0"), dict(face_indices="01")):
        with pytest.raises(InputError):
            GenerateConfig(**bad)
    assert main(["generate", "--model", str(tmp_path / "absent"), "--adapter", str(tmp_path / "a.safetensors"),
                 "--refs", "a.png", "--out", str(tmp_path / "o.png"), "--weight", "nan"]) == 2
    assert "weight=nan" in capsys.readouterr().err
    np.save(tmp_path / "emb.npy", np.array([[0.1, np.nan]], np.float32))
    assert main(["generate", "--model", str(tmp_path / "absent"), "--adapter", str(tmp_path / "a.safetensors"),
                 "--refs", "a.png", "--out", str(tmp_path / "o.png"), "--embeddings", str(tmp_path / "emb.npy")]) == 2
    assert "non-finite values (NaN or inf) at [[0, 1]]" in capsys.readouterr().err


def test_nan_embeddings_and_a_single_reference_path_are_refused(pipe, refs, tmp_path):
    ip = IdGlowPipeline(pipe, _trained(IdGlowAdapter.init_for(pipe.transformer)))
    emb = random_embeddings(2).numpy()
    emb[1, 3] = np.nan
    with pytest.raises(InputError, match=r"Precomputed embeddings contain non-finite values .* at \[\[1, 3\]\]"):
        ip(refs, GenerateConfig(**FAST), embeddings=emb)
    Image.fromarray(refs[0]).save(tmp_path / "ref.png")
    with pytest.raises(InputError, match="got a single path .*ref.png'. Wrap it in a list"):
        ip(str(tmp_path / "ref.png"), GenerateConfig(**FAST), embeddings=emb[:1])
    with pytest.raises(InputError, match=r"single image"):
        ip(refs[0], GenerateConfig(**FAST))
