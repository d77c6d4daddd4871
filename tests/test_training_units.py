"""Config, manifest validation, checkpoints and the loop's data order: fast, no models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idglow_core.errors import ConfigError, ManifestError
from idglow_core.faces.base import Face
from idglow_core.training import checkpoint as ckpt_mod
from idglow_core.training.checkpoint import (Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint,
                                             prepare_output_dir, save_checkpoint)
from idglow_core.training.config import load_config
from idglow_core.training.data import fit_area, read_manifest, write_synthetic_manifest
from idglow_core.training.loop import MetricBuffer, sample_indices

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


# ----------------------------------------------------------------------------------------------- config
def test_yaml_config_and_overrides():
    cfg = load_config(TINY)
    assert cfg.model.tiny and cfg.run.train == "lora" and cfg.data.synthetic == 4
    assert cfg.loss.omega.name == "anneal"  # task group -> Eq. 4
    cfg = load_config(TINY, ["loss.id_weight=0", "loss.task=age", "optim.betas=[0.8, 0.9]", "run.train=full"])
    assert cfg.loss.id_weight == 0.0 and cfg.optim.betas == (0.8, 0.9) and cfg.run.train == "full"
    assert cfg.loss.omega.name == "gate" and cfg.loss.omega(0.45) == 1.0 and cfg.loss.omega(0.7) == 0.0  # Eq. 5
    assert load_config(TINY, ["loss.schedule=constant"]).loss.omega(0.01) == 1.0
    cfg = load_config(TINY, ["optim.lr=5e-5", "optim.max_steps=7.0", "run.output_dir=123"])  # YAML 1.1 quirks
    assert cfg.optim.lr == 5e-5 and cfg.optim.max_steps == 7 and cfg.run.output_dir == "123"
    assert load_config(TINY, ["loss.schedule=anneal(tau=0.5)"]).loss.omega(0.75) == pytest.approx(0.5)


@pytest.mark.parametrize("override,match", [
    (["loss.idweight=1"], "Unknown key"), (["losses.id_weight=1"], "Unknown config section"),
    (["loss.id_weight"], "section.key=value"), (["loss.schedule=wobble"], "Unknown schedule"),
    (["run.train=everything"], "run.train"), (["model.tiny=false"], "model.pretrained"),
    (["data.resolution=100"], "multiple of 32"), (["optim.max_steps=abc"], "optim.max_steps expects int"),
    (["optim.max_steps=2.5"], "expects int"), (["run.overwrite=maybe"], "expects bool"), (["loss.timestep_scheme=cosine"], "timestep_scheme"),
])
def test_config_errors_say_what_to_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, override)


def test_cli_flags_map_to_overrides():
    from idglow_core.training.cli import overrides_from_args
    from train.sft import FLAGS, build_parser

    args = build_parser().parse_args(["--id-weight", "0", "--schedule", "constant", "--task", "age",
                                      "--train", "full", "--overwrite", "--set", "optim.lr=0.5"])
    ov = overrides_from_args(args, FLAGS)
    cfg = load_config(TINY, ov)
    assert (cfg.loss.id_weight, cfg.loss.schedule, cfg.loss.task, cfg.run.train, cfg.run.overwrite, cfg.optim.lr) == \
        (0.0, "constant", "age", "full", True, 0.5)


def test_dpo_cli_flags_map_to_overrides():
    from idglow_core.training.cli import overrides_from_args
    from idglow_core.training.dpo import load_dpo_config
    from train.dpo import FLAGS, build_parser

    args = build_parser().parse_args(["--beta", "500", "--alpha", "2", "--margin", "0.1", "--sft-weight", "0.5",
                                      "--max-steps", "7", "--gradient-checkpointing"])
    cfg = load_dpo_config(Path(__file__).parents[1] / "train" / "configs" / "dpo_tiny_cpu.yaml",
                          overrides_from_args(args, FLAGS))
    assert (cfg.dpo.beta, cfg.dpo.alpha, cfg.dpo.margin, cfg.dpo.sft_weight) == (500.0, 2.0, 0.1, 0.5)
    assert cfg.train.optim.max_steps == 7 and cfg.train.run.gradient_checkpointing is True


# ----------------------------------------------------------------------------------------------- data
class StubAnalyzer:
    """A face in every image except all-black ones."""
    name, embedding_dim = "stub", 4

    def analyze(self, image):
        if image.max() == 0:
            return []
        kps = np.array([[10, 10], [20, 10], [15, 15], [11, 20], [19, 20]], np.float32)
        return [Face(np.array([5, 5, 25, 25], np.float32), kps, 1.0, np.ones(4, np.float32) / 2)]


def _img(path: Path, value: int) -> str:
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(path)
    return path.name


def test_manifest_validation_lists_every_problem_with_line_numbers(tmp_path):
    good, black = _img(tmp_path / "a.png", 128), _img(tmp_path / "black.png", 0)
    (tmp_path / "broken.jpg").write_text("not an image")
    lines = [json.dumps({"target": good, "refs": [good, good], "prompt": "p", "task": "group"}),
             "{not json",
             json.dumps({"target": "missing.jpg", "refs": [good], "prompt": "p"}),
             json.dumps({"target": good, "refs": [good, black], "prompt": "p"}),
             json.dumps({"target": good, "refs": ["broken.jpg"], "prompt": "p"}),
             json.dumps({"target": good, "refs": [good], "task": "party"}),
             json.dumps({"target": good, "refs": [good] * 5})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, StubAnalyzer(), max_ids=4)
    msg = str(info.value)
    assert "line 1:" not in msg and "has 6 problem(s)" in msg
    for needle in ("line 2: not valid JSON", "line 3: target Image file not found", "missing.jpg",
                   "line 4: no face found in reference 2", "line 5: reference 1 ", "broken.jpg' is not an image",
                   "line 6: 'task' must be one of", "line 7: 5 references"):
        assert needle in msg
    manifest.write_text(lines[0] + "\n")
    (sample,) = read_manifest(manifest, StubAnalyzer())
    assert sample.target == tmp_path / good and len(sample.ref_faces) == 2 and sample.task == "group"


def test_fit_area_and_synthetic_manifest(tmp_path, data_dir):
    out = fit_area(np.zeros((400, 600, 3), np.uint8), 256 * 256)
    assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0 and out.shape[:2] == (224, 320)
    path = write_synthetic_manifest(tmp_path, 3, [data_dir / "obama.jpg", data_dir / "biden.jpg"], size=32)
    samples = read_manifest(path, StubAnalyzer())
    assert len(samples) == 3 and all(len(s.refs) == 2 for s in samples)
    assert np.asarray(Image.open(samples[0].target)).shape == (32, 64, 3)


# ----------------------------------------------------------------------------------------------- checkpoints
def _ckpt(step: int) -> Checkpoint:
    return Checkpoint(step=step, trainable={"a.weight": torch.full((2, 2), float(step))},
                      optimizer={"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2, 2)}},
                                 "param_groups": [{"lr": 0.1, "params": [0]}]},
                      ema=None, state={"seed": 3})


def test_checkpoints_roundtrip_and_keep_newest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _ckpt(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.step == 3 and loaded.state["seed"] == 3
    assert torch.equal(loaded.trainable["a.weight"], torch.full((2, 2), 3.0))
    assert loaded.optimizer["state"][0]["step"].item() == 3.0 and loaded.ema is None


def test_killed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _ckpt(1))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing optimizer.pt")
    monkeypatch.setattr(ckpt_mod.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 1
    assert list((tmp_path / "checkpoints").glob(".tmp-step-*"))  # the half-written temp folder is ignored
    save_checkpoint(tmp_path, _ckpt(3))
    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))  # and cleaned up by the next save


def test_output_folder_rules(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_dir(out) is None and out.is_dir()
    save_checkpoint(out, _ckpt(4))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        prepare_output_dir(out)
    assert prepare_output_dir(out, resume="latest").name == "step-00000004"
    assert prepare_output_dir(out, overwrite=True) is None
    assert not (out / "checkpoints").exists() and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no checkpoint found"):
        prepare_output_dir(out, resume="latest")


# ----------------------------------------------------------------------------------------------- loop pieces
def test_sample_order_is_a_permutation_per_epoch_and_ranks_are_disjoint():
    n, world = 6, 2
    epoch0 = [i for m in range(3) for r in range(world) for i in sample_indices(n, 7, m, r, world, 1)]
    assert sorted(epoch0) == list(range(n))
    assert sample_indices(n, 7, 1, 0, world, 1) == sample_indices(n, 7, 1, 0, world, 1)  # pure function
    assert sample_indices(n, 7, 0, 0, 1, n) != sample_indices(n, 8, 0, 0, 1, n)  # the seed changes the order


def test_metric_buffer_averages_observations():
    buf = MetricBuffer()
    buf.add({"a": 1.0, "b": [1.0, 3.0]})
    buf.add({"a": 3.0})
    assert buf.means() == {"a": 2.0, "b": 2.0} and buf.means() == {}


def test_packing_matches_diffusers_edit_pipeline():
    from diffusers import QwenImageEditPlusPipeline

    from idglow_core.training.packing import edit_inputs, pack_latents, unpack_latents

    z = torch.randn(2, 4, 1, 6, 8)
    packed = pack_latents(z)
    assert torch.equal(packed, QwenImageEditPlusPipeline._pack_latents(z, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), z)
    assert torch.equal(unpack_latents(packed, 6, 8), QwenImageEditPlusPipeline._unpack_latents(packed, 48, 64, 8))
    inputs = edit_inputs(z, [torch.randn(2, 4, 1, 4, 4)], torch.tensor([0.2, 0.9]))
    assert inputs["hidden_states"].shape == (2, 12 + 4, 16) and inputs["img_shapes"][1] == [(1, 3, 4), (1, 2, 2)]
    assert torch.equal(inputs["hidden_states"][:, :12], packed) and inputs["timestep"].tolist() == pytest.approx([0.2, 0.9])


def _toy_run(out: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    from idglow_core.training.loop import LoopParts, StepOutput, run_loop

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    xs = [torch.tensor([float(i), 1.0, -float(i)]) for i in range(8)]

    def step_fn(m, b, generator):
        loss = ((m(b["x"]) - 1.0) ** 2).mean()
        return StepOutput(loss, {"x_mean": b["x"][:, 0].tolist()})

    cfg = load_config(TINY, [f"run.output_dir={out}", f"data.batch_size={batch}", f"optim.grad_accum={accum}",
                             "optim.max_steps=3", "run.tensorboard=false", "optim.max_grad_norm=0", "optim.lr=0.1"])
    parts = LoopParts(module, xs, lambda items: {"x": torch.stack(items)}, step_fn,
                      export=lambda m, folder, state: (folder / "w.txt").write_text(str(state["weight"].tolist())))
    result = run_loop(cfg, parts)
    assert (result.final_dir / "w.txt").is_file() and len(result.history) == 3
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    a = _toy_run(tmp_path / "a", batch=2, accum=1)
    b = _toy_run(tmp_path / "b", batch=1, accum=2)  # same samples, split into two micro-batches
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c = _toy_run(tmp_path / "c", batch=1, accum=1)
    assert not torch.allclose(a["weight"], c["weight"])


def test_collate_pads_prompts_and_rejects_mixed_sizes():
    from idglow_core.training.encode import collate

    def item(length: int, side: int = 4) -> dict:
        return {"latents": torch.zeros(4, 1, side, side), "ref_latents.0": torch.zeros(4, 1, 2, 2),
                "ref_latents.1": torch.ones(4, 1, 2, 2), "prompt_embeds": torch.ones(length, 3),
                "prompt_mask": torch.ones(length, dtype=torch.long), "id_embeds": torch.zeros(2, 8),
                "ref_face_embeds": torch.zeros(2, 5)}
    batch = collate([item(2), item(5)])
    assert batch["prompt_embeds"].shape == (2, 5, 3) and batch["prompt_mask"].tolist()[0] == [1, 1, 0, 0, 0]
    assert len(batch["ref_latents"]) == 2 and torch.equal(batch["ref_latents"][1], torch.ones(2, 4, 1, 2, 2))
    assert batch["id_mask"].shape == (2, 2) and len(batch["ref_face_embeds"]) == 2
    with pytest.raises(ConfigError, match="batch_size=1"):
        collate([item(2), item(2, side=6)])
