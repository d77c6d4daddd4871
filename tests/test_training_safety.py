"""Trainers never destroy finished work (issue 13, "Trainers"): --overwrite checks everything first and removes
only an IdGlow run's files, non-finite losses stop the run before anything non-finite is saved, damaged
checkpoints / cache entries / start weights are named or recovered, a resume refuses config changes that break
the run, a full disk is a typed error, prompt DPO follows the same folder rules, metrics keep one row per step.

Most tests run the shared loop on a toy ``nn.Linear`` (milliseconds per step); the trainer-level tests stop
before any model is built (``build_pipeline`` is replaced by a tripwire) or run the tiny stack for 2 steps.
"""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from idglow_core.errors import (CheckpointWriteError, ConfigError, IdGlowError, ModelFormatError,
                                ModelNotFoundError, TrainingDivergedError)
from idglow_core.testing import OneFaceAnalyzer
from idglow_core.training import checkpoint as ckpt_mod
from idglow_core.training import load_config
from idglow_core.training.checkpoint import (Checkpoint, list_checkpoints, load_checkpoint, prepare_output_dir,
                                             save_checkpoint, select_resume_checkpoint)
from idglow_core.training.config import config_to_dict
from idglow_core.training.loop import LoopParts, StepOutput, make_accelerator, run_loop
from idglow_core.training.run_dir import MARKER, claim_run, plan_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"
DPO_TINY = ROOT / "train" / "configs" / "dpo_tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------------ helpers
def _toy_cfg(out: Path, *extra: str):
    return load_config(None, ["model.tiny=true", "data.synthetic=4", f"run.output_dir={out}",
                              "run.tensorboard=false", "optim.max_steps=4", "run.checkpoint_every=2",
                              "run.keep_checkpoints=10", "optim.lr=0.1", *extra])


def _toy_parts(nan_steps=(), poison_step=None, export=None) -> LoopParts:
    """nn.Linear(2, 1) fitting y = x0 - x1; the loss is NaN on the 1-based steps in ``nan_steps``; at
    ``poison_step`` the step fills the weight with NaN after computing a finite loss."""
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1)
    samples = [{"x": torch.tensor([float(i), 1.0]), "y": torch.tensor([i - 1.0])} for i in range(4)]
    calls = {"n": 0}

    def step_fn(mod, batch, generator):
        calls["n"] += 1
        loss = (mod(batch["x"]) - batch["y"]).pow(2).mean()
        if calls["n"] in nan_steps:
            loss = loss * float("nan")
        if calls["n"] == poison_step:
            with torch.no_grad():
                mod.weight.fill_(float("nan"))
        return StepOutput(loss=loss)

    def default_export(mod, folder, state):
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "w.safetensors"))

    return LoopParts(module=module, samples=samples, step_fn=step_fn, export=export or default_export,
                     collate=lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]})


def _run_toy(out: Path, *extra: str, resume_from=None, **parts):
    cfg = _toy_cfg(out, *extra)
    return run_loop(cfg, _toy_parts(**parts), resume_from=resume_from, accelerator=make_accelerator(cfg))


def _ckpt(step: int, config: dict | None = None) -> Checkpoint:
    return Checkpoint(step=step, trainable={"a.weight": torch.full((2, 2), float(step))},
                      optimizer={"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2, 2)}},
                                 "param_groups": [{"lr": 0.1, "params": [0]}]},
                      ema=None, state={"seed": 0, "config": config or {}})


def _finished_run(out: Path, config: dict | None = None) -> None:
    """A folder as a finished IdGlow run leaves it: marker, config.yaml, a checkpoint, final weights."""
    prepare_output_dir(out)
    save_checkpoint(out, _ckpt(2, config))
    (out / "final").mkdir()
    save_file({"w": torch.ones(2)}, str(out / "final" / "idglow_adapter.safetensors"))
    (out / "config.yaml").write_text("run: {}\n")


def _intact(out: Path) -> bool:
    return [p.name for p in list_checkpoints(out)] == ["step-00000002"] and \
        (out / "final" / "idglow_adapter.safetensors").is_file() and load_checkpoint(list_checkpoints(out)[0])


@pytest.fixture
def no_pipeline(monkeypatch):
    """Fail loudly if a trainer gets as far as building the Qwen-Image-Edit pipeline."""
    from idglow_core.training import models

    def tripwire(cfg):
        raise AssertionError("the pipeline was built")
    monkeypatch.setattr(models, "build_pipeline", tripwire)


# ------------------------------------------------------------------------------------------------ (a) --overwrite
def test_overwrite_checks_manifest_and_start_weights_before_removing_the_previous_run(tmp_path, no_pipeline):
    from idglow_core.training.sft import run_sft

    out = tmp_path / "run"
    _finished_run(out)
    base = [f"run.output_dir={out}", "run.overwrite=true", "run.tensorboard=false"]
    typo = load_config(TINY, [*base, "data.synthetic=0", f"data.manifest={tmp_path / 'trian.jsonl'}"])
    with pytest.raises(IdGlowError, match="trian.jsonl"):
        run_sft(typo, analyzer=OneFaceAnalyzer())
    assert _intact(out)
    damaged = tmp_path / "start.safetensors"
    save_file({"w": torch.ones(64)}, str(damaged))
    damaged.write_bytes(damaged.read_bytes()[:60])  # cut short
    with pytest.raises(ModelFormatError, match="model.init_adapter.*start.safetensors.*damaged"):
        run_sft(load_config(TINY, [*base, f"model.init_adapter={damaged}"]), analyzer=OneFaceAnalyzer())
    with pytest.raises(ModelNotFoundError, match="model.init_adapter.*strat.safetensors"):
        run_sft(load_config(TINY, [*base, f"model.init_adapter={tmp_path / 'strat.safetensors'}"]),
                analyzer=OneFaceAnalyzer())
    nan = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(nan))
    with pytest.raises(ModelFormatError, match="NaN or inf"):
        run_sft(load_config(TINY, [*base, f"model.init_adapter={nan}"]), analyzer=OneFaceAnalyzer())
    assert _intact(out)


def test_overwrite_never_touches_a_folder_idglow_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "lab-notes.txt").write_text("three weeks of notes")
    (out / "config.yaml").write_text("my: settings\n")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="no IdGlow run wrote it"):
            prepare_output_dir(out, overwrite=overwrite)
    assert (out / "logs" / "lab-notes.txt").read_text() == "three weeks of notes" and (out / "config.yaml").exists()


def test_a_failed_start_leaves_nothing_that_blocks_the_rerun(tmp_path, monkeypatch):
    from idglow_core.training import models
    from idglow_core.training.sft import run_sft

    def broken(cfg, **kwargs):
        raise RuntimeError("out of memory while loading the model")
    monkeypatch.setattr(models, "build_pipeline", broken)
    out = tmp_path / "run"
    cfg = load_config(TINY, [f"run.output_dir={out}", "data.synthetic=2", "run.tensorboard=false"])
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sft(cfg, analyzer=OneFaceAnalyzer())
    assert (out / "synthetic").is_dir() and (out / MARKER).is_file()  # the failed start wrote its data ...
    assert prepare_output_dir(out) is None  # ... and the corrected rerun goes ahead without --overwrite


# ------------------------------------------------------------------------------------------------ (b) non-finite
def test_first_nonfinite_loss_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as info:
        _run_toy(out, "optim.max_steps=6", nan_steps=range(3, 100))
    message = str(info.value)
    assert "stopped at step 3" in message and "the loss is nan" in message and "optim.lr=0.1" in message
    assert "step-00000002' is intact" in message and "--resume latest" in message
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"] and not (out / "final").exists()
    weights = load_checkpoint(list_checkpoints(out)[0]).trainable
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_skip_nonfinite_skips_isolated_steps_and_stops_after_n_in_a_row(tmp_path):
    out = tmp_path / "skip"
    result = _run_toy(out, "optim.skip_nonfinite=1", "run.checkpoint_every=1", nan_steps=(3,))
    w2, w3 = (load_checkpoint(out / "checkpoints" / f"step-0000000{s}").trainable for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the bad step changed nothing (no AdamW step)
    assert result.history[2]["nonfinite/skipped"] == 1.0 and "nonfinite/skipped" not in result.history[3]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "final" / "w.safetensors")).values())
    with pytest.raises(TrainingDivergedError, match="stopped at step 4.*2 non-finite steps in a row"):
        _run_toy(tmp_path / "stop", "optim.skip_nonfinite=1", nan_steps=range(3, 100))


def test_nonfinite_weights_are_never_saved_or_exported(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="Refusing to write checkpoint step 2.*weight"):
        _run_toy(out, poison_step=2)
    assert list_checkpoints(out) == [] and not (out / "final").exists()


def test_absurd_learning_rate_stops_the_tiny_trainer_naming_the_step_and_cause(tmp_path, capsys, monkeypatch):
    """The issue's case on the tiny stack: lr 1e30 used to exit 0 with NaN weights; now exit code 2."""
    import idglow_core.training as training
    from idglow_core.training.sft import run_sft
    from train.sft import main

    monkeypatch.setattr(training, "run_sft", lambda cfg: run_sft(cfg, analyzer=OneFaceAnalyzer()))  # no dlib
    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--output-dir", str(out), "--lr", "1e30", "--max-steps", "2",
               "--id-weight", "0", "--set", "data.synthetic=2", "--set", "run.checkpoint_every=1",
               "--set", "run.tensorboard=false", "--set", "run.validate_every=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Training stopped at step 2" in err and "optim.lr=1e+30" in err, err[-2000:]
    assert not (out / "final").exists()
    for ckpt in list_checkpoints(out):
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "trainable.safetensors")).values())


@pytest.mark.parametrize("override,match", [
    ("optim.lr=.nan", "finite optim.lr"), ("optim.lr=.inf", "finite optim.lr"),
    ("optim.betas=[1.5, 0.9]", "optim.betas"), ("optim.weight_decay=-1", "weight_decay"),
    ("optim.max_grad_norm=.nan", "max_grad_norm"), ("loss.id_weight=.nan", "finite"),
    ("optim.skip_nonfinite=-1", "skip_nonfinite"),
])
def test_invalid_optimiser_and_loss_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_invalid_dpo_values_are_config_errors():
    from idglow_core.training.dpo import load_dpo_config

    for override in ("dpo.beta=.inf", "dpo.margin=.nan", "optim.lr=.nan"):
        with pytest.raises(ConfigError):
            load_dpo_config(DPO_TINY, [override])


# ------------------------------------------------------------------------------------------------ (c) damage
def test_damaged_newest_checkpoint_is_named_and_latest_falls_back(tmp_path, caplog):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _ckpt(step), keep=5)
    newest, middle = tmp_path / "checkpoints" / "step-00000006", tmp_path / "checkpoints" / "step-00000004"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated tensors
    (middle / "state.json").write_text("")  # empty state file
    with pytest.raises(ModelFormatError, match=f"'{weights}' is damaged"):
        load_checkpoint(newest)
    with pytest.raises(ModelFormatError, match=f"'{weights}' is damaged"):
        select_resume_checkpoint(tmp_path, str(newest))  # an explicit folder: named, no silent fallback
    with caplog.at_level(logging.WARNING, logger="idglow"):
        path, state = select_resume_checkpoint(tmp_path, "latest")
    assert path.name == "step-00000002" and state["step"] == 2
    assert str(weights) in caplog.text and str(middle / "state.json") in caplog.text
    assert "falling back to" in caplog.text
    opt = tmp_path / "checkpoints" / "step-00000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # damaged optimizer state
    with pytest.raises(ModelFormatError, match="every checkpoint.*damaged"):
        select_resume_checkpoint(tmp_path, "latest")
    with pytest.raises(ModelFormatError, match=f"'{opt}' is damaged"):
        load_checkpoint(opt.parent)


def test_resume_from_a_mismatched_optimizer_state_names_the_file(tmp_path):
    out = tmp_path / "run"
    _run_toy(out, "optim.max_steps=2")
    ckpt = out / "checkpoints" / "step-00000002"
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}, ckpt / "optimizer.pt")
    with pytest.raises(ModelFormatError, match="optimizer.pt"):
        _run_toy(out, resume_from=ckpt)


def test_damaged_cache_entry_is_encoded_again(tmp_path, data_dir, caplog, monkeypatch):
    from idglow_core.training.data import Sample
    from idglow_core.training.encode import SampleEncoder

    calls = []

    def fake_encode(self, sample):  # what the VAE / text encoder would return, counted
        calls.append(sample.line)
        return {"latents": torch.ones(4, 1, 2, 2), "prompt_embeds": torch.ones(3, 8),
                "prompt_mask": torch.ones(3, dtype=torch.long), "ref_latents.0": torch.ones(4, 1, 2, 2)}
    monkeypatch.setattr(SampleEncoder, "_encode", fake_encode)
    monkeypatch.setattr(SampleEncoder, "_identities", lambda self, s: {"id_embeds": torch.zeros(1, 8)})
    sample = Sample(line=1, target=data_dir / "obama.jpg", refs=[data_dir / "biden.jpg"], prompt="p", task="group")
    SampleEncoder(None, None, 64, tmp_path, areas=(64, 64))(0, sample)
    entry, = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])  # a cache file cut short (disk full, killed copy)
    with caplog.at_level(logging.WARNING, logger="idglow"):
        enc = SampleEncoder(None, None, 64, tmp_path, areas=(64, 64))(0, sample)
    assert len(calls) == 2 and str(entry) in caplog.text and "encoding the sample again" in caplog.text
    assert torch.equal(enc["latents"], torch.ones(4, 1, 2, 2))
    assert set(load_file(str(entry))) >= {"latents", "prompt_embeds"}  # the entry was rewritten intact


@pytest.mark.parametrize("damaged_file", ["idglow_adapter.safetensors", "pytorch_lora_weights.safetensors"])
def test_damaged_dpo_init_from_is_refused_before_the_pipeline_is_built(tmp_path, no_pipeline, damaged_file):
    from idglow_core.training.dpo import load_dpo_config, run_dpo

    sft = tmp_path / "sft" / "final"
    sft.mkdir(parents=True)
    for name in ("idglow_adapter.safetensors", "pytorch_lora_weights.safetensors"):
        save_file({"w": torch.ones(256)}, str(sft / name))
    (sft / damaged_file).write_bytes((sft / damaged_file).read_bytes()[:70])
    out = tmp_path / "dpo"
    _finished_run(out)
    cfg = load_dpo_config(DPO_TINY, [f"run.output_dir={out}", f"dpo.init_from={tmp_path / 'sft'}",
                                     "run.overwrite=true", "data.synthetic=2", "run.tensorboard=false"])
    with pytest.raises(ModelFormatError, match=f"dpo.init_from.*'{sft / damaged_file}' is damaged"):
        run_dpo(cfg, analyzer=OneFaceAnalyzer())
    assert _intact(out)


# ------------------------------------------------------------------------------------------------ (d) config
def test_resume_refuses_a_config_change_that_breaks_the_run(tmp_path, no_pipeline):
    from idglow_core.training.sft import run_sft

    out = tmp_path / "run"
    args = [f"run.output_dir={out}", "data.synthetic=2", "run.tensorboard=false", "optim.max_steps=4"]
    _finished_run(out, config_to_dict(load_config(TINY, args)))  # a checkpoint at step 2
    changed = load_config(TINY, [*args, "run.resume=latest", "run.seed=7", "data.resolution=96"])
    with pytest.raises(ConfigError, match=r"data.resolution: 32 -> 96; run.seed: 0 -> 7.*--allow-config-change"):
        run_sft(changed, analyzer=OneFaceAnalyzer())
    assert (out / "config.yaml").read_text() == "run: {}\n"  # nothing rewritten
    with pytest.raises(ConfigError, match="at step 2, but optim.max_steps is 1"):  # the '275 -> 3' case
        run_sft(load_config(TINY, [*args, "run.resume=latest", "optim.max_steps=1"]), analyzer=OneFaceAnalyzer())


def test_allowed_and_forced_config_changes_are_recorded(tmp_path):
    out = tmp_path / "run"
    args = [f"run.output_dir={out}", "data.synthetic=2", "optim.max_steps=4"]
    _finished_run(out, config_to_dict(load_config(TINY, args)))
    longer = config_to_dict(load_config(TINY, [*args, "optim.max_steps=10", "optim.lr=1e-5"]))
    plan = plan_run(out, resume="latest", config=longer)  # how long and how fast: allowed without a flag
    assert plan.changes == {"optim.lr": [1e-3, 1e-5], "optim.max_steps": [4, 10]} and plan.resume_step == 2
    forced = config_to_dict(load_config(TINY, [*args, "run.seed=3", "run.allow_config_change=true"]))
    plan = plan_run(out, resume="latest", config=forced, allow_changes=True)
    claim_run(plan, forced)
    record = json.loads((out / "logs" / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["changes"]["run.seed"] == [0, 3]
    assert "seed: 3" in (out / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------------ (e) disk
def test_full_disk_during_a_save_is_a_typed_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _ckpt(1))

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC (seen on a 1 MiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, _ckpt(2))
    message = str(info.value)
    assert "No space left on device" in message and "free disk space" in message
    assert f"'{tmp_path / 'checkpoints' / 'step-00000001'}' is intact" in message and "--resume latest" in message
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(ckpt_mod.torch, "save", read_only)
    with pytest.raises(CheckpointWriteError, match=f"Read-only file system.*make '{tmp_path}' writable"):
        save_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert load_checkpoint(list_checkpoints(tmp_path)[0]).step == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no half-written folder left behind
    assert isinstance(info.value, OSError) and isinstance(info.value, IdGlowError)


def test_full_disk_during_the_export_names_the_intact_checkpoint(tmp_path):
    def export(mod, folder, state):
        raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="final weights.*step-00000004' is intact.*--resume latest"):
        _run_toy(out, export=export)
    assert load_checkpoint(out / "checkpoints" / "step-00000004").step == 4
    assert not (out / "final").exists() and not list(out.glob(".tmp-final-*"))


# ------------------------------------------------------------------------------------------------ (f) prompt DPO
def test_prompt_dpo_follows_the_output_folder_rules(tmp_path):
    from idglow_core.prompting.alignment import load_config as prompt_config
    from idglow_core.prompting.alignment import train_prompt_dpo

    tiny = ROOT / "train" / "configs" / "prompt_dpo_tiny_cpu.yaml"
    out = tmp_path / "run"
    (out / "lora").mkdir(parents=True)
    (out / MARKER).write_text("{}")
    (out / "lora" / "adapter_model.safetensors").write_text("a finished LoRA")
    missing = str(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match="already exists.*--resume latest.*--overwrite"):
        train_prompt_dpo(prompt_config(tiny, output_dir=str(out), pairs=missing))
    with pytest.raises(IdGlowError, match="Preference-pair file not found"):  # checked before anything is removed
        train_prompt_dpo(prompt_config(tiny, output_dir=str(out), pairs=missing, overwrite=True))
    assert (out / "lora" / "adapter_model.safetensors").read_text() == "a finished LoRA"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no IdGlow run wrote it"):
        train_prompt_dpo(prompt_config(tiny, output_dir=str(foreign), overwrite=True))
    with pytest.raises(ConfigError, match="no trainer checkpoint"):
        train_prompt_dpo(prompt_config(tiny, output_dir=str(out), resume=True))


def test_prompt_dpo_flags_are_spelled_like_the_other_trainers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prompt_dpo_cli", ROOT / "train" / "prompt_dpo.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args(["--output-dir", "a", "--max-steps", "7", "--overwrite",
                                          "--learning-rate", "0.001", "--resume", "latest"])
    assert (args.output_dir, args.max_steps, args.overwrite, args.learning_rate) == ("a", 7, True, 1e-3)
    from idglow_core.prompting.alignment import load_config as prompt_config
    assert prompt_config(None, resume=args.resume).resume is True
    old = cli.build_parser().parse_args(["--output_dir", "b", "--max_steps", "3"])  # the old spelling still works
    assert (old.output_dir, old.max_steps, old.overwrite) == ("b", 3, None)


# ------------------------------------------------------------------------------------------------ (g) metrics
def test_metrics_keep_one_row_per_step_after_a_resume(tmp_path):
    out = tmp_path / "run"
    _run_toy(out)  # steps 1-4, checkpoints at 2 and 4
    metrics = out / "logs" / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 5, "loss/to')  # a line cut short by a kill
    _run_toy(out, resume_from=out / "checkpoints" / "step-00000002")  # steps 3-4 again
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
