"""The VLM prompt enricher M_P (paper §3.2) with tiny random Qwen2.5-VL / Qwen3-VL models, offline."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from idglow_core.errors import ConfigError, InputError, ModelFormatError, ModelNotFoundError
from idglow_core.prompting import (EnrichConfig, check_prompt, enrich_prompt, enrich_prompt_from_tensors,
                                   fallback_prompt, load_vlm, static_prompt)
from idglow_core.prompting import enricher
from idglow_core.prompting.enricher import build_messages, system_prompt
from idglow_core.prompting.testing import build_tiny_vlm, save_tiny_vlm

SHORT = EnrichConfig(max_new_tokens=12)
GOOD_GROUP = ("The person from Picture 1 stands on the left in a red jacket with short black hair; the person from "
              "Picture 2 stands on the right in a blue dress, both lit by warm sunlight, laughing on a bench.")
GOOD_AGE = ("The person from Picture 1 and the person from Picture 2 as six-year-old children with child-like "
            "proportions, a larger head and rounder cheeks, playing together in soft morning light.")


@pytest.fixture(scope="module")
def tiny25():
    return build_tiny_vlm("qwen2_5_vl")


def _refs(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tiny_vlm_writes_a_string_then_falls_back(family, caplog):
    vlm = build_tiny_vlm(family)
    with caplog.at_level(logging.WARNING, logger="idglow"):
        result = enrich_prompt(vlm, _refs(), "a picnic at the beach", "group", config=SHORT)
    greedy, sampled = result.attempts
    assert greedy.decoding == "greedy" and sampled.decoding == "sampled, seed 0"
    assert isinstance(greedy.text, str) and greedy.text  # the random model does write something
    assert any("does not mention subject(s) Picture 1, Picture 2" in i for i in greedy.issues)
    assert result.source == "static"
    assert result.prompt == static_prompt("group", 2) + " Instruction: a picnic at the beach"
    assert "using the static template" in caplog.text


def test_validator_catches_an_omitted_subject():
    assert check_prompt(GOOD_GROUP, "group", 2) == []
    omitted = GOOD_GROUP.replace("the person from Picture 2", "another person")
    assert check_prompt(omitted, "group", 2) == ["does not mention subject(s) Picture 2"]
    assert check_prompt(GOOD_GROUP, "group", 3) == ["does not mention subject(s) Picture 3"]
    assert check_prompt(GOOD_GROUP, "group", 1) == ["mentions Picture 2 but only 1 picture(s) were given"]
    assert check_prompt("Picture 1 and Picture 2 together.", "group", 2) == ["too short (6 words, need 12)"]


def test_validator_requires_children_for_the_age_task():
    assert check_prompt(GOOD_AGE, "age", 2) == []
    adults = GOOD_GROUP  # names both subjects, but no children and no child-like proportions
    assert check_prompt(adults, "age", 2) == ["does not describe the subjects as children with child-like proportions"]
    no_proportions = GOOD_AGE.replace("with child-like proportions, a larger head and rounder cheeks, ", "")
    assert check_prompt(no_proportions, "age", 2) != []


def test_system_prompt_has_spatial_instructions_and_task_rules():
    text = system_prompt("group", 3)
    assert "Picture 1 is the person on the left; Picture 2 is the person in the middle; Picture 3 is the " \
           "person on the right" in text
    assert "child-like proportions" in system_prompt("age", 2) and "child" not in text
    messages = build_messages("  ", "age", 2)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "Task instruction: Compose a natural group photo of these people."
    with pytest.raises(InputError, match="Unknown task"):
        system_prompt("portrait", 2)


def _scripted(monkeypatch, outputs):
    """Replace the decoder with scripted answers; record the seed of each call (None = greedy)."""
    seeds = []

    def fake(vlm, images, messages, config, seed):
        seeds.append(seed)
        out = outputs[len(seeds) - 1]
        if isinstance(out, Exception):
            raise out
        return out

    monkeypatch.setattr(enricher, "_generate", fake)
    return seeds


def test_greedy_answer_that_passes_is_used(monkeypatch, tiny25):
    seeds = _scripted(monkeypatch, [f'Prompt: "{GOOD_GROUP}"'])
    result = enrich_prompt(tiny25, _refs(), "", "group", seed=5)
    assert (result.source, result.prompt, seeds) == ("vlm", GOOD_GROUP, [None])  # prefix and quotes cleaned


def test_retry_is_sampled_with_the_seed(monkeypatch, tiny25):
    seeds = _scripted(monkeypatch, ["<think>plan</think> two people", GOOD_AGE])
    result = enrich_prompt(tiny25, _refs(), "", "age", seed=7)
    assert (result.source, result.prompt, seeds) == ("vlm_retry", GOOD_AGE, [None, 7])
    assert result.attempts[0].text == "two people"


def test_generation_error_and_no_retry_fall_back(monkeypatch, tiny25):
    seeds = _scripted(monkeypatch, [RuntimeError("CUDA out of memory"), "Picture 1"])
    result = enrich_prompt(tiny25, _refs(), "", "group", config=EnrichConfig(retry=False))
    assert (result.source, seeds) == ("static", [None])
    assert result.prompt == fallback_prompt("group", 2) == static_prompt("group", 2)
    assert result.attempts[0].issues == ["generation failed: CUDA out of memory"]


def test_node_core_is_deterministic_per_seed(tiny25):
    batch = torch.rand(2, 40, 36, 3, generator=torch.Generator().manual_seed(0))
    first = enrich_prompt_from_tensors(tiny25, batch, "beach", "age", k=0, seed=3, config=SHORT)
    again = enrich_prompt_from_tensors(tiny25, [batch[:1], None, batch[1:]], "beach", "age", seed=3, config=SHORT)
    other = enrich_prompt_from_tensors(tiny25, batch, "beach", "age", seed=4, config=SHORT)
    assert first.prompt == again.prompt and first.attempts == again.attempts
    assert first.attempts[0].text == other.attempts[0].text  # greedy does not depend on the seed
    assert first.attempts[1].text != other.attempts[1].text  # the sampled retry does


def test_node_core_rejects_bad_inputs(tiny25):
    with pytest.raises(InputError, match="must be an IMAGE tensor"):
        enrich_prompt_from_tensors(tiny25, torch.rand(40, 36, 3), "", "group")
    with pytest.raises(InputError, match="No reference image"):
        enrich_prompt_from_tensors(tiny25, [None, None], "", "group")
    with pytest.raises(InputError, match="2 reference image"):
        enrich_prompt_from_tensors(tiny25, torch.rand(2, 40, 36, 3), "", "group", k=3)
    with pytest.raises(ConfigError):
        EnrichConfig(max_new_tokens=0)


def test_load_vlm_reads_a_saved_folder(tmp_path):
    folder = save_tiny_vlm(tmp_path / "vlm", "qwen3_vl", seed=1)
    loaded, memory = load_vlm(folder, dtype="fp32"), build_tiny_vlm("qwen3_vl", seed=1)
    assert loaded.family == "qwen3_vl" and loaded.load_device == "cpu" and loaded.lora is None
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded.model(input_ids=ids).logits, memory.model(input_ids=ids).logits)
    a = enrich_prompt(loaded, _refs(), "x", "group", config=SHORT)
    b = enrich_prompt(memory, _refs(), "x", "group", config=SHORT)
    assert a.attempts == b.attempts  # the processor rebuilt from the folder tokenizes the same way


def test_load_vlm_errors_say_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="VLM folder not found"):
        load_vlm(tmp_path / "missing")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFormatError, match="needs one of qwen2_5_vl"):
        load_vlm(tmp_path / "llama")
    with pytest.raises(ModelNotFoundError, match="No config.json"):
        load_vlm(tmp_path)
    folder = save_tiny_vlm(tmp_path / "vlm", "qwen2_5_vl")
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        load_vlm(folder, lora=tmp_path)
    with pytest.raises(ConfigError, match="Unknown dtype"):
        load_vlm(folder, dtype="int3")
