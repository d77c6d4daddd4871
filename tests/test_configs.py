"""Every YAML config shipped in train/configs parses into its dataclass (no typo waits for a GPU run)."""
from pathlib import Path

import pytest
import yaml

from idglow_core.preference.config import load_pairs_config
from idglow_core.prompting.alignment import load_config as load_prompt_dpo_config
from idglow_core.training import load_config, load_dpo_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml"))


def _loader(name: str):
    if name.startswith("accelerate_"):
        return None
    if name.startswith("prompt_dpo"):
        return load_prompt_dpo_config
    if name.startswith("dpo"):
        return load_dpo_config
    if name.startswith("pairs"):
        return load_pairs_config
    return load_config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    loader = _loader(path.name)
    if loader is None:  # accelerate's own format: check the keys the README relies on
        cfg = yaml.safe_load(path.read_text())
        assert cfg["mixed_precision"] == "bf16" and cfg["distributed_type"] in ("MULTI_GPU", "FSDP")
        return
    assert loader(path) is not None


def test_real_scale_configs_use_the_paper_schedules():
    sft = load_config(CONFIGS[0].parent / "sft_qwen_edit_2511.yaml")
    assert sft.loss.omega.name == "anneal" and sft.run.mixed_precision == "bf16"
    age = load_config(CONFIGS[0].parent / "sft_qwen_edit_2511.yaml", overrides=["loss.task=age"])
    assert age.loss.omega.name == "gate" and age.loss.omega.params == {"lo": 0.3, "hi": 0.6}
    dpo = load_dpo_config(CONFIGS[0].parent / "dpo_qwen_edit_2511.yaml")
    assert dpo.dpo.init_from and dpo.train.run.train == "lora"


def test_config_files_that_cannot_be_used_raise_config_errors(tmp_path):
    from idglow_core.errors import ConfigError
    from idglow_core.yamlfile import read_yaml_mapping

    assert read_yaml_mapping(None, "Config", "train/configs/") == {}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml", "Config", "x") == {}
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for name, match in (("missing.yaml", "not found.*See train/configs/"), ("bad.yaml", "not valid YAML"),
                        ("list.yaml", "must be a mapping")):
        for loader in (load_config, load_dpo_config, load_pairs_config):
            with pytest.raises(ConfigError, match=match):
                loader(tmp_path / name)
