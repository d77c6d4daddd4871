"""Training injects as deployed (issue 12, points 1 and 6).

- each sample's injection strength is its own task's Omega(t) (group: anneal Eq. 4, age: gate Eq. 5), or 1
  with ``loss.injection=constant``; the step hands it to the module and logs ``inject/scale``;
- the train module's forward with that strength equals the diffusers route IdGlowPipeline uses
  (``attention_kwargs={"idglow": adapter.condition(schedule=Omega)}``), and equals the base DiT where Omega = 0;
- with grad, every adapter parameter is in the graph even at Omega = 0 (DDP's find_unused_parameters=False);
- the adapter file records the training injection; the pipeline and the nodes warn when deploying another;
- a run mixes group and age manifest lines.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from idglow_core.adapter import TRAIN_INJECTION_KEY, IdGlowAdapter
from idglow_core.errors import ConfigError
from idglow_core.schedules import TASK_SCHEDULES, Schedule
from idglow_core.training.config import LossConfig
from idglow_core.training.sft import SFTStep

ANNEAL, GATE = TASK_SCHEDULES["group"].to_str(), TASK_SCHEDULES["age"].to_str()


def test_per_sample_omega_and_injection_by_hand():
    tasks, t = ["group", "age", "group", "age"], torch.tensor([0.65, 0.45, 0.2, 0.7])
    cfg = LossConfig()
    # group: (t - 0.3) / 0.7 (Eq. 4) -> 0.5 at 0.65, 0 at 0.2; age: 1 inside [0.3, 0.6] (Eq. 5)
    assert cfg.omega_per_sample(tasks, t).tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert cfg.injection_scale(tasks, t).tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert LossConfig(injection="constant").injection_scale(tasks, t).tolist() == [1.0] * 4
    assert LossConfig(schedule="constant").omega_per_sample(tasks, t).tolist() == [1.0] * 4  # override: every task
    assert LossConfig(task="age").injection_scale(None, t).tolist() == [0.0, 1.0, 0.0, 0.0]  # no tasks: loss.task
    assert cfg.train_injection(tasks) == {"age": GATE, "group": ANNEAL}
    assert LossConfig(injection="constant").train_injection(tasks) == {"*": Schedule("constant").to_str()}
    with pytest.raises(ConfigError, match="loss.injection"):
        LossConfig(injection="gate")
    with pytest.raises(ConfigError, match="injects nothing"):
        LossConfig(schedule="none")
    with pytest.raises(ConfigError, match="one entry per sample"):
        cfg.injection_scale(["group"], t)


class Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.inject = torch.nn.Parameter(torch.tensor(0.7)), None

    def forward(self, z_t, t, refs, pe, pm, ids, id_mask, inject=None):
        self.inject = inject
        return self.w * z_t


def _batch(tasks):
    b = len(tasks)
    return {"latents": torch.randn(b, 4, 1, 4, 4, generator=torch.Generator().manual_seed(0)), "ref_latents": [],
            "prompt_embeds": torch.zeros(b, 3, 4), "prompt_mask": torch.ones(b, 3),
            "id_embeds": torch.zeros(b, 2, 8), "id_mask": torch.ones(b, 2, dtype=torch.bool), "task": tasks}


@pytest.mark.parametrize("injection", ["schedule", "constant"])
def test_step_injects_each_samples_own_omega(injection):
    module, tasks = Velocity(), ["group", "age", "age"]
    out = SFTStep(LossConfig(id_weight=0.0, injection=injection), None, None)(
        module, _batch(tasks), torch.Generator().manual_seed(3))
    t = torch.rand(3, generator=torch.Generator().manual_seed(3))  # the step's draw (uniform, first)
    omega = [max(0.0, (t[0].item() - 0.3) / 0.7)] + [float(0.3 <= x <= 0.6) for x in t[1:].tolist()]
    want = omega if injection == "schedule" else [1.0, 1.0, 1.0]
    assert module.inject.tolist() == pytest.approx(want, abs=1e-6)
    assert out.logs["inject/scale"] == pytest.approx(sum(want) / 3, abs=1e-6)
    assert out.logs["omega/mean"] == pytest.approx(sum(omega) / 3, abs=1e-6)  # ID-loss weight: per task too


def _module():
    from idglow_core.testing import tiny_edit_pipeline
    from idglow_core.training.config import TrainConfig
    from idglow_core.training.models import build_train_module

    torch.manual_seed(0)
    module = build_train_module(TrainConfig(), tiny_edit_pipeline(text_encoder=False, seed=0), id_dim=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in module.adapter.blocks:  # a trained-looking adapter
            blk.to_out.weight.copy_(0.3 * torch.randn(blk.to_out.weight.shape, generator=g))
    return module


def _inputs(t):
    from idglow_core.training.packing import edit_inputs

    g = torch.Generator().manual_seed(2)
    z_t, refs = torch.randn(2, 4, 1, 8, 8, generator=g), [torch.randn(2, 4, 1, 8, 8, generator=g)]
    pe, pm = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.long)
    ids = torch.nn.functional.normalize(torch.randn(2, 2, 8, generator=g), dim=-1)
    mask = torch.ones(2, 2, dtype=torch.bool)
    return (z_t, t, refs, pe, pm, ids, mask), dict(**edit_inputs(z_t, refs, t), encoder_hidden_states=pe,
                                                   encoder_hidden_states_mask=pm, return_dict=False)


def test_train_module_injects_like_the_pipeline():
    from idglow_core.training.packing import unpack_latents

    module, t = _module(), torch.tensor([0.65, 0.2])
    args, call = _inputs(t)
    group = TASK_SCHEDULES["group"]
    with torch.no_grad():
        trained = module(*args, LossConfig().injection_scale(["group", "group"], t))
        cond = module.adapter.condition(args[5], args[6], weight=1.0, schedule=group)  # IdGlowPipeline's route
        deployed = unpack_latents(module.transformer(**call, attention_kwargs={"idglow": cond})[0][:, :16], 8, 8)
        base = unpack_latents(module.transformer(**call)[0][:, :16], 8, 8)
        full = module(*args)  # inject None = strength 1 at every t (the old training behaviour)
    assert torch.allclose(trained, deployed, atol=1e-6)
    assert (trained[0] - base[0]).abs().max() > 1e-3 and torch.equal(trained[1], base[1])  # Omega(0.2) = 0
    assert (full[1] - base[1]).abs().max() > 1e-3  # constant strength would inject where the pipeline does not


def test_every_adapter_parameter_is_in_the_graph_at_omega_zero():
    module = _module()
    args, _ = _inputs(torch.tensor([0.1, 0.2]))
    module(*args, torch.zeros(2)).square().mean().backward()
    grads = {n: p.grad for n, p in module.adapter.named_parameters()}
    assert all(g is not None for g in grads.values())  # DDP sees every parameter used
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())  # ... and the strength 0 gives 0 gradient


def test_adapter_file_records_the_injection_and_deploying_another_warns(tmp_path, caplog):
    from idglow_core.testing import tiny_edit_pipeline

    adapter = IdGlowAdapter.init_for(tiny_edit_pipeline(text_encoder=False).transformer, id_dim=8)
    path = adapter.save(tmp_path / "a.safetensors", {"trainer": "idglow-sft",
                                                     TRAIN_INJECTION_KEY: json.dumps({"group": ANNEAL, "age": GATE})})
    loaded = IdGlowAdapter.load(path)
    assert loaded.trained_injection == {"group": ANNEAL, "age": GATE}
    caplog.set_level(logging.WARNING, logger="idglow")
    assert loaded.check_deployed_schedule(TASK_SCHEDULES["group"], "group") and not caplog.records
    assert loaded.check_deployed_schedule(TASK_SCHEDULES["age"]) and not caplog.records  # nodes: any trained task
    assert not loaded.check_deployed_schedule(Schedule("constant"), "group")
    assert "trained with" in caplog.text and "constant" in caplog.text
    old = adapter.save(tmp_path / "old.safetensors", {"trainer": "idglow-sft"})  # trained before the change
    assert IdGlowAdapter.load(old).trained_injection == {"*": Schedule("constant").to_str()}
    assert not IdGlowAdapter.load(old).check_deployed_schedule(TASK_SCHEDULES["age"], "age")
    plain = adapter.save(tmp_path / "plain.safetensors")  # not from a trainer: nothing known, no warning
    assert IdGlowAdapter.load(plain).trained_injection is None


def test_one_run_mixes_group_and_age_rows(tmp_path):
    from idglow_core.testing import OneFaceAnalyzer
    from idglow_core.training import load_config
    from idglow_core.training.data import write_synthetic_manifest
    from idglow_core.training.sft import default_photos, run_sft

    manifest = write_synthetic_manifest(tmp_path / "data", 2, default_photos(), size=64)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    lines[1]["task"] = "age"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "train" / "configs" / "tiny_cpu.yaml",
                      [f"run.output_dir={tmp_path / 'run'}", f"data.manifest={manifest}", "data.synthetic=0",
                       "optim.max_steps=2", "run.tensorboard=false", "loss.id_weight=0", "run.train=adapter",
                       "run.checkpoint_every=0"])
    result = run_sft(cfg, analyzer=OneFaceAnalyzer())
    adapter = IdGlowAdapter.load(result.final_dir / "idglow_adapter.safetensors")
    assert adapter.trained_injection == {"group": ANNEAL, "age": GATE}
    rows = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all("inject/scale" in r and "omega/mean" in r for r in rows)
