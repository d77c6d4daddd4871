"""The SFT trainer end to end on the tiny offline stack: trains, freezes the base, exports loadable files,
resumes exactly, refuses to overwrite, counts missing faces on the real detector path.

Two kinds of face handling, on purpose:
- ``StubAnalyzer`` (most tests): finds one fixed face in every image, including the decoded one-step
  estimates, so the ID-loss path (crop -> ArcFace -> Hungarian -> gradient) really runs.
- the real dlib analyzer (``test_tiny_config_with_real_face_detector``): the tiny random model decodes no
  faces, so every ID-loss evaluation must count its references as missing (value 1.0 each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from idglow_core.errors import ConfigError
from idglow_core.images import load_image
from idglow_core.testing import OneFaceAnalyzer
from idglow_core.training import load_config
from idglow_core.training.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


StubAnalyzer = OneFaceAnalyzer  # one fixed face in every image


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sft_cache")  # encodings shared by every run of this module


def _cfg(out: Path, cache: Path, *extra: str):
    return load_config(TINY, [f"run.output_dir={out}", f"data.cache_dir={cache}", "data.synthetic=2",
                              "loss.schedule=constant", "run.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("lora_run") / "run"
    cfg = _cfg(out, cache_dir, "run.validate_every=3", "run.validate_steps=2")
    return cfg, run_sft(cfg, analyzer=StubAnalyzer())


def test_three_steps_train_adapter_and_lora_not_the_base(lora_run, cache_dir):
    from idglow_core.testing import tiny_edit_pipeline

    cfg, result = lora_run
    cached = list(Path(cache_dir).glob("*.safetensors"))  # one encoding per sample, reused by later runs
    keys = set(load_file(str(cached[0])))
    assert len(cached) == 2 and {"latents", "prompt_embeds", "ref_latents.1"} <= keys
    assert not keys & {"id_embeds", "ref_face_embeds"}  # face-model outputs are per run, never cached
    assert result.step == 3 and [row["step"] for row in result.history] == [1, 2, 3]
    row = result.history[-1]
    # the stub finds one face per decoded image for two references: one matched, one missing (value 1.0)
    assert row["id_loss/active_frac"] == 1.0 and row["faces/missing_frac"] == 0.5 and 0.5 <= row["loss/id"] < 1.5
    module = result.module
    for blk in module.adapter.blocks:  # zero-initialised output projections moved
        assert blk.to_out.weight.abs().sum() > 0
    ckpt2 = load_file(str(Path(cfg.run.output_dir) / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    final = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt2) == set(final)
    assert any(".lora_A." in k for k in final) and any(k.startswith("adapter.") for k in final)
    assert all(not torch.equal(ckpt2[k], final[k]) for k in final if k.startswith("adapter.encoder.proj"))
    base = tiny_edit_pipeline(seed=cfg.run.seed).transformer.state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in module.transformer.state_dict().items() if "lora_" not in k}
    assert set(trained) == set(base) and all(torch.equal(trained[k], base[k]) for k in base)
    assert "val/facesim" not in result.history[1]  # validation FaceSim every 3 steps
    assert -1.0 <= row["val/facesim"] <= 1.0 and row["val/faces_found"] == 1.0  # the stub finds one face
    val_dir = Path(cfg.run.output_dir) / "validation"  # the validation images themselves
    shots = sorted(p.name for p in val_dir.iterdir())
    assert shots == ["step-00000003-0.png"] and load_image(val_dir / shots[0]).shape[2] == 3
    metrics = [json.loads(x) for x in (Path(cfg.run.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and {"loss/flow", "loss/id", "omega/mean", "lr"} <= set(metrics[0])


def test_exported_files_load_into_idglow_pipeline_with_identical_output(lora_run, data_dir):
    from peft.utils import get_peft_model_state_dict

    from idglow_core.adapter import IdGlowAdapter
    from idglow_core.pipeline import GenerateConfig, IdGlowPipeline
    from idglow_core.testing import small_edit_images, tiny_edit_pipeline

    cfg, result = lora_run
    final = result.final_dir
    lora = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(k.endswith(".lora_A.weight") for k in lora)
    module = result.module
    module.detach_hooks()
    module.eval()
    in_memory = tiny_edit_pipeline(seed=cfg.run.seed)
    in_memory.transformer = module.transformer
    loaded = tiny_edit_pipeline(seed=cfg.run.seed)
    loaded.load_lora_weights(str(final))  # the diffusers API
    assert len(get_peft_model_state_dict(loaded.transformer, adapter_name="default_0")) == len(lora)
    adapter = IdGlowAdapter.load(final / "idglow_adapter.safetensors", loaded.transformer)
    assert adapter.config.id_dim == 8 and adapter.default_schedule.name == "constant"
    refs = [str(data_dir / "obama.jpg"), str(data_dir / "biden.jpg")]
    emb = torch.nn.functional.normalize(torch.arange(16.0).reshape(2, 8) + 1, dim=-1)
    gen = GenerateConfig(steps=2, height=32, width=32, true_cfg_scale=1.0, output_type="pt", seed=3)
    with small_edit_images(32 * 32):
        a = IdGlowPipeline(in_memory, module.adapter)(refs, gen, embeddings=emb).images[0]
        b = IdGlowPipeline(loaded, adapter)(refs, gen, embeddings=emb).images[0]
        fresh = IdGlowAdapter.init_for(loaded.transformer, id_dim=8, tokens_per_id=2)
        c = IdGlowPipeline(loaded, fresh)(refs, gen, embeddings=emb).images[0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4  # the trained adapter matters: the comparison above is not vacuous


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cache_dir):
    straight = _cfg(tmp_path / "a", cache_dir, "optim.max_steps=4", "run.checkpoint_every=2", "optim.ema_decay=0.5")
    run_sft(straight, analyzer=StubAnalyzer())
    first = _cfg(tmp_path / "b", cache_dir, "optim.max_steps=2", "run.checkpoint_every=2", "optim.ema_decay=0.5")
    run_sft(first, analyzer=StubAnalyzer())
    with pytest.raises(ConfigError, match="already exists"):  # never overwrite silently
        run_sft(_cfg(tmp_path / "b", cache_dir, "optim.max_steps=4"), analyzer=StubAnalyzer())
    resumed = _cfg(tmp_path / "b", cache_dir, "optim.max_steps=4", "run.resume=latest", "optim.ema_decay=0.5")
    result = run_sft(resumed, analyzer=StubAnalyzer())
    assert [row["step"] for row in result.history] == [3, 4]
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(tmp_path / "a" / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "b" / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    ea = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000004" / "ema.safetensors"))
    eb = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000004" / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea) and any(not torch.equal(ea[k], wa[k]) for k in ea)
    exported = load_file(str(tmp_path / "b" / "final" / "idglow_adapter.safetensors"))  # EMA weights exported
    assert all(torch.equal(exported[k], eb["adapter." + k]) for k in exported)


def test_full_finetune_updates_the_dit_and_exports_shards(tmp_path, cache_dir):
    from diffusers import QwenImageTransformer2DModel

    cfg = _cfg(tmp_path / "full", cache_dir, "run.train=full", "optim.max_steps=1", "loss.id_weight=0",
               "run.gradient_checkpointing=true")
    result = run_sft(cfg, analyzer=StubAnalyzer())
    tr = result.module.transformer
    frozen = {k for k, p in tr.named_parameters() if not p.requires_grad}
    last = f"transformer_blocks.{len(tr.transformer_blocks) - 1}."
    dead = (".txt_mlp.", ".to_add_out.", ".add_q_proj.", ".norm_added_q.")
    assert frozen and all(k.startswith(last) and any(d in k for d in dead) for k in frozen)
    assert {d for d in dead if any(d in k for k in frozen)} == set(dead)
    folder = result.final_dir / "transformer"
    assert list(folder.glob("*.safetensors"))
    reloaded = QwenImageTransformer2DModel.from_pretrained(str(folder))
    from idglow_core.testing import tiny_edit_pipeline
    base = tiny_edit_pipeline(seed=0).transformer.state_dict()
    new = reloaded.state_dict()
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    assert "transformer_blocks.0.attn.to_q.weight" in changed and "img_in.weight" in changed
    last = len(tr.transformer_blocks) - 1  # never trained: no gradient reaches the last text-stream output
    assert f"transformer_blocks.{last}.txt_mlp.net.2.weight" not in changed


def test_tiny_config_with_real_face_detector(tmp_path):
    """The shipped tiny config as a user runs it (dlib references, tiny ArcFace): missing faces counted."""
    assert load_config(TINY).loss.omega.name == "anneal"
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'tiny'}", "data.synthetic=2", "loss.schedule=constant"])
    result = run_sft(cfg)
    ran = [row for row in result.history if "loss/id" in row]
    assert len(ran) == 3
    for row in ran:  # on a random tiny model no face is decoded: 1.0 per reference (facesim.id_loss)
        assert row["loss/id"] == 1.0 and row["faces/missing_frac"] == 1.0
    assert result.history[-1]["val/facesim"] == 0.0 and result.history[-1]["val/faces_found"] == 0.0
    assert (result.final_dir / "idglow_adapter.safetensors").is_file()


def test_insightface_path_reads_arcface_from_the_buffalo_folder(tmp_path):
    """Paper-faithful wiring with the tiny buffalo_l stand-in (its detector finds bright 32x32 squares):
    references and ID tokens from insightface (512-d), the ID loss's ArcFace read from w600k_r50.onnx."""
    from PIL import Image

    from idglow_core.adapter import IdGlowAdapter
    from idglow_core.faces.testing import write_tiny_buffalo

    buffalo = write_tiny_buffalo(tmp_path / "buffalo_l")
    data = tmp_path / "data"
    data.mkdir()
    for name, width in (("a.png", 64), ("b.png", 64), ("group.png", 128)):
        img = np.zeros((64, width, 3), np.uint8)
        img[:32, :32] = 255
        if width == 128:
            img[:32, 64:96] = 255
        Image.fromarray(img).save(data / name)
    (data / "m.jsonl").write_text(json.dumps({"target": "group.png", "refs": ["a.png", "b.png"], "prompt": "two"}))
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", f"data.manifest={data / 'm.jsonl'}",
                             "data.synthetic=0", "model.face_backend=insightface", f"model.face_model_dir={buffalo}",
                             "model.arcface_onnx=", "optim.max_steps=1", "loss.schedule=constant",
                             "run.tensorboard=false", "run.validate_every=0"])
    result = run_sft(cfg)
    assert result.history[-1]["id_loss/active_frac"] == 1.0 and "loss/id" in result.history[-1]
    adapter = IdGlowAdapter.load(result.final_dir / "idglow_adapter.safetensors")
    assert adapter.config.id_dim == 512
