"""The DPO trainer end to end on the tiny offline stack: trains 3 steps with the shipped tiny config, logs the
DPO metrics, moves the adapter and LoRA but not the base, exports loadable files, starts from SFT outputs,
resumes exactly, and the CLI runs / refuses bad configs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from idglow_core.errors import ConfigError, ModelNotFoundError
from idglow_core.testing import OneFaceAnalyzer
from idglow_core.training.dpo import find_init_weights, load_dpo_config, load_init_weights, run_dpo

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "dpo_tiny_cpu.yaml"
DPO_KEYS = {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "implicit_acc", "lr"}


StubAnalyzer = OneFaceAnalyzer  # one fixed face in every image (8-d embedding from the image's colours)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo_cache")


def _cfg(out: Path, cache: Path, *extra: str):
    return load_dpo_config(TINY, [f"run.output_dir={out}", f"data.cache_dir={cache}", "data.synthetic=2",
                                  "run.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def run3(tmp_path_factory, cache_dir):
    cfg = _cfg(tmp_path_factory.mktemp("dpo_run") / "run", cache_dir)
    return cfg, run_dpo(cfg, analyzer=StubAnalyzer())


def test_tiny_config_trains_three_dpo_steps(run3):
    from idglow_core.testing import tiny_edit_pipeline

    cfg, result = run3
    out = Path(cfg.train.run.output_dir)
    assert result.step == 3 and [row["step"] for row in result.history] == [1, 2, 3]
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(DPO_KEYS <= set(r) for r in rows)
    assert rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # fresh start: policy == reference
    assert rows[0]["implicit_acc"] == 0.0 and 0.0 <= rows[2]["implicit_acc"] <= 1.0
    r = rows[1]
    assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-4)
    assert rows[1]["rewards/margins"] != 0.0 and rows[1]["loss/dpo"] != pytest.approx(math.log(2), abs=1e-4)
    module = result.module
    assert all(blk.to_out.weight.abs().sum() > 0 for blk in module.adapter.blocks)  # zero-init moved
    # every LoRA B moved from its zero init; the last block's text-query projection, whose gradient would be
    # exactly 0 (only the discarded text stream of that block reads it), carries no LoRA at all
    dead = f"transformer_blocks.{len(module.transformer.transformer_blocks) - 1}.attn.add_q_proj."
    lora_b = {n: p for n, p in module.named_parameters() if "lora_B" in n}
    assert len(lora_b) > 10 and all(p.requires_grad for p in lora_b.values())
    assert not any(dead in n for n in lora_b) and all(p.abs().sum() > 0 for p in lora_b.values())
    base = tiny_edit_pipeline(seed=cfg.train.run.seed).transformer.state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in module.transformer.state_dict().items() if "lora_" not in k}
    assert set(trained) == set(base) and all(torch.equal(trained[k], base[k]) for k in base)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dpo"]["beta"] == 2500.0 and saved["run"]["train"] == "lora"
    assert json.loads((result.final_dir / "outputs.json").read_text())["trainer"] == "idglow-dpo"


def test_exported_files_load(run3):
    from idglow_core.adapter import IdGlowAdapter
    from idglow_core.testing import tiny_edit_pipeline

    cfg, result = run3
    pipe = tiny_edit_pipeline(seed=0, text_encoder=False)
    pipe.load_lora_weights(str(result.final_dir))  # diffusers format
    adapter = IdGlowAdapter.load(result.final_dir / "idglow_adapter.safetensors", pipe.transformer)
    trained = result.module.adapter.state_dict()
    assert all(torch.equal(adapter.state_dict()[k], trained[k]) for k in trained)
    lora = load_file(str(result.final_dir / "pytorch_lora_weights.safetensors"))
    mine = {n: p for n, p in result.module.transformer.named_parameters() if "lora_" in n}
    assert len(lora) == len(mine) and all(k.startswith("transformer.") for k in lora)


def test_resume_matches_the_uninterrupted_run(run3, tmp_path, cache_dir):
    cfg, _ = run3
    first = _cfg(tmp_path / "b", cache_dir, "optim.max_steps=2")
    run_dpo(first, analyzer=StubAnalyzer())
    with pytest.raises(ConfigError, match="already exists"):
        run_dpo(_cfg(tmp_path / "b", cache_dir), analyzer=StubAnalyzer())
    result = run_dpo(_cfg(tmp_path / "b", cache_dir, "run.resume=latest"), analyzer=StubAnalyzer())
    assert [row["step"] for row in result.history] == [3]
    a = Path(cfg.train.run.output_dir) / "checkpoints" / "step-00000003"
    b = tmp_path / "b" / "checkpoints" / "step-00000003"
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = torch.load(a / "optimizer.pt", weights_only=True), torch.load(b / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])


def _sft_like_output(folder: Path) -> dict[str, torch.Tensor]:
    """An SFT-style final folder (adapter + diffusers LoRA) with non-trivial weights; returns its tensors."""
    from test_dpo_step import _tiny_module
    from idglow_core.training.export import export_weights

    module = _tiny_module("lora", perturb=True)
    folder.mkdir(parents=True)
    export_weights(module, folder, "lora", {"trainer": "idglow-sft"})
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def test_init_from_sft_outputs_and_checkpoints(run3, tmp_path):
    from test_dpo_step import _tiny_module

    cfg, _ = run3
    expected = _sft_like_output(tmp_path / "sft" / "final")
    init = find_init_weights(tmp_path / "sft")  # the run folder resolves to its final/
    assert init.adapter.name == "idglow_adapter.safetensors" and init.lora.name == "pytorch_lora_weights.safetensors"
    from idglow_core.adapter import IdGlowAdapter
    module = _tiny_module("lora", perturb=False)
    module.adapter.load_state_dict(IdGlowAdapter.load(init.adapter).state_dict())  # what model.init_adapter does
    load_init_weights(module, init, "lora")
    got = {k: p for k, p in module.named_parameters() if p.requires_grad}
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    ckpt = Path(cfg.train.run.output_dir) / "checkpoints" / "step-00000002"
    fresh = _tiny_module("lora", perturb=False)
    load_init_weights(fresh, find_init_weights(ckpt), "lora")
    state = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(p, state[k]) for k, p in fresh.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="run.train=lora"):
        load_init_weights(_tiny_module("adapter", perturb=False), init, "adapter")
    with pytest.raises(ModelNotFoundError, match="holds no SFT weights"):
        find_init_weights(tmp_path / "nothing")


def test_dpo_run_from_sft_output_starts_at_the_reference(tmp_path, cache_dir):
    """dpo.reference=start (default): step 1 of a run from SFT weights is ln 2 with rewards 0, for alpha 2;
    dpo.reference=base compares with the base DiT instead (the SFT weights show in Delta). The sequential
    mode trains through the loop (two backward parts per micro-step) from the same start."""
    _sft_like_output(tmp_path / "sft" / "final")
    common = (f"dpo.init_from={tmp_path / 'sft'}", "optim.max_steps=1", "dpo.alpha=2")
    row = run_dpo(_cfg(tmp_path / "run", cache_dir, *common), analyzer=StubAnalyzer()).history[0]
    assert row["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6) and DPO_KEYS <= set(row)
    assert row["rewards/chosen"] == 0.0 and row["rewards/rejected"] == 0.0
    assert row["mse/chosen"] == row["mse_ref/chosen"] and 0.0 <= row["inject/scale"] <= 1.0
    base = run_dpo(_cfg(tmp_path / "base", cache_dir, *common, "dpo.reference=base"),
                   analyzer=StubAnalyzer()).history[0]
    assert base["mse/chosen"] != pytest.approx(base["mse_ref/chosen"], abs=1e-6)  # SFT weights are active
    assert base["rewards/chosen"] != 0.0
    seq = run_dpo(_cfg(tmp_path / "seq", cache_dir, *common, "dpo.sequential=true", "optim.max_steps=2"),
                  analyzer=StubAnalyzer())
    assert seq.history[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert seq.history[1]["loss/dpo"] != pytest.approx(math.log(2), abs=1e-6)  # it trained
    meta = json.loads((seq.final_dir / "outputs.json").read_text())
    assert json.loads(meta["dpo"])["sequential"] is True and "group" in json.loads(meta["train_injection"])


def test_config_rules():
    cfg = load_dpo_config(TINY, ["dpo.beta=100", "dpo.alpha=2"])
    assert (cfg.dpo.beta, cfg.dpo.alpha, cfg.dpo.margin) == (100.0, 2.0, 0.0)
    assert load_dpo_config(None, ["model.tiny=true", "data.synthetic=1"]).train.run.output_dir == "runs/dpo"
    with pytest.raises(ConfigError, match="Unknown key"):
        load_dpo_config(TINY, ["dpo.gamma=1"])
    with pytest.raises(ConfigError, match="beta > 0"):
        load_dpo_config(TINY, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="run.train=full is not supported"):
        load_dpo_config(TINY, ["run.train=full"])
    with pytest.raises(ConfigError, match="Keep one"):
        load_dpo_config(TINY, ["dpo.init_from=a", "model.init_adapter=b.safetensors"])


def test_cli_runs_the_shipped_tiny_config_with_real_faces(tmp_path, capsys):
    """As a user runs it: dlib reference faces, synthetic pairs, one step; a bad config exits with 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_cli", ROOT / "train" / "dpo.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    assert cli.main(["--config", str(TINY), "--output-dir", str(out), "--max-steps", "1", "--beta", "50",
                     "--set", "run.tensorboard=false", "--set", "data.synthetic=2", "--set", "run.validate_every=1",
                     "--set", "run.validate_samples=1", "--set", "run.validate_steps=2"]) == 0
    assert (out / "final" / "idglow_adapter.safetensors").is_file()
    row = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert DPO_KEYS <= set(row)
    assert row["val/faces_found"] == 0.0 and row["val/facesim"] == 0.0  # a random tiny model draws no face
    assert cli.main(["--config", str(TINY), "--output-dir", str(tmp_path / "x"), "--set", "run.train=full"]) == 2
    assert "run.train=full is not supported" in capsys.readouterr().err
