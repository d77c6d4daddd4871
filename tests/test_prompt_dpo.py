"""Badcase-driven prompt DPO: pair validation, config, a 3-step trl run on a tiny VLM, loading its LoRA."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idglow_core.errors import ConfigError, IncompatibleAdapterError, ManifestError
from idglow_core.prompting import load_vlm
from idglow_core.prompting.alignment import load_config, train_prompt_dpo
from idglow_core.prompting.pairs import TAXONOMY, read_pairs, write_synthetic_pairs
from idglow_core.prompting.testing import build_tiny_vlm
from idglow_core.prompting.vlm import apply_lora

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "prompt_dpo_tiny_cpu.yaml"


def test_synthetic_pairs_are_valid_and_cover_the_taxonomy(tmp_path):
    pairs = read_pairs(write_synthetic_pairs(tmp_path, n=3, k=2, seed=1))
    assert [p.taxonomy for p in pairs] == list(TAXONOMY)
    for pair in pairs:
        assert len(pair.images) == 2 and all(p.is_file() for p in pair.images)
        assert "Picture 1" in pair.chosen and "Picture 2" in pair.chosen and "Picture" not in pair.rejected


def test_bad_pair_lines_are_all_listed_up_front(tmp_path):
    good = json.loads(write_synthetic_pairs(tmp_path, n=1).read_text().splitlines()[0])
    lines = [good, dict(good, images=["images/nope.png", good["images"][1]]), dict(good, taxonomy="blur"),
             "{not json", {k: v for k, v in good.items() if k != "chosen"}, dict(good, rejected=good["chosen"])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ManifestError) as info:
        read_pairs(path)
    message = str(info.value)
    assert "has 5 problem(s)" in message
    assert f"line 2: image not found: '{tmp_path / 'images' / 'nope.png'}'" in message
    assert "line 3: unknown taxonomy 'blur'" in message and "line 4: not valid JSON" in message
    assert "line 5: missing field 'chosen'" in message and "line 6: 'chosen' and 'rejected' are identical" in message


def test_config_from_yaml_with_overrides():
    config = load_config(TINY, learning_rate="2e-3", target_modules="q_proj")
    assert config.model == "tiny:qwen2_5_vl" and config.max_steps == 3
    assert config.learning_rate == 2e-3 and config.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="Unknown config key"):
        load_config(TINY, max_step=3)
    with pytest.raises(ConfigError, match="'max_steps' must be >= 1"):
        load_config(TINY, max_steps=0)
    with pytest.raises(ConfigError, match="must be int"):
        load_config(TINY, lora_r="four")


def test_three_dpo_steps_train_a_lora_that_loads_and_changes_the_output(tmp_path):
    config = load_config(TINY, output_dir=str(tmp_path / "run"))
    lora, history = train_prompt_dpo(config)
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B starts at 0: policy = reference
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["rewards/margins"] > 0
    weights = load_file(str(lora / "adapter_model.safetensors"))
    b_keys = [k for k in weights if "lora_B" in k]
    assert b_keys and all(weights[k].abs().max() > 0 for k in b_keys)  # every B moved away from its zero init
    assert (lora / "idglow_prompt_dpo.yaml").is_file()

    base = tmp_path / "run" / "base_model"
    plain, tuned = load_vlm(base), load_vlm(base, lora=lora)
    assert tuned.lora == str(lora) and not any("lora_" in n for n, _ in tuned.model.named_parameters())
    ids = torch.tensor([[40, 41, 42, 43, 44]])
    with torch.no_grad():
        diff = (plain.model(input_ids=ids).logits - tuned.model(input_ids=ids).logits).abs().max()
    assert diff > 1e-4
    with pytest.raises(IncompatibleAdapterError, match="trained on a qwen2_5_vl model"):
        apply_lora(build_tiny_vlm("qwen3_vl").model, lora)


def test_cli_reports_bad_pairs_without_loading_a_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prompt_dpo_cli", ROOT / "train" / "prompt_dpo.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--config", str(TINY), "--pairs", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path)])
    assert rc == 2 and "Preference-pair file not found" in capsys.readouterr().err
    assert not (tmp_path / "base_model").exists()
