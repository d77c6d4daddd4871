"""The prompt-enricher nodes inside a real ComfyUI (``COMFYUI_DIR``; skipped with a printed reason when unset).

The nodes' logic is ``enrich_prompt_from_tensors`` / ``load_vlm``, tested without ComfyUI in
test_prompting_enricher.py; here: registration, schema, model-folder listing and one run of each node.
"""
from __future__ import annotations

import pytest
import torch

import comfy_helpers as ch


@pytest.fixture(scope="module")
def comfy():
    return ch.boot_comfy()


def test_vlm_nodes_are_registered_with_descriptions_and_tooltips(comfy):
    assert {"IdGlowVLMLoader", "IdGlowPromptEnricher"} <= set(comfy["new_nodes"])
    for node_id in ("IdGlowVLMLoader", "IdGlowPromptEnricher"):
        schema = comfy["nodes"].NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.description and all(i.tooltip for i in schema.inputs)
    assert "LLM" in comfy["folder_paths"].folder_names_and_paths


def test_loader_lists_the_folder_and_enricher_falls_back_deterministically(comfy, tmp_path):
    from idglow_core.errors import InputError, ModelNotFoundError
    from idglow_core.prompting import static_prompt
    from idglow_core.prompting.testing import save_tiny_vlm

    folder_paths, mapping = comfy["folder_paths"], comfy["nodes"].NODE_CLASS_MAPPINGS
    save_tiny_vlm(tmp_path / "llm" / "tiny-qwen3-vl", "qwen3_vl")
    folder_paths.add_model_folder_path("LLM", str(tmp_path / "llm"))
    loader, enricher = mapping["IdGlowVLMLoader"], mapping["IdGlowPromptEnricher"]
    options = next(i for i in loader.GET_SCHEMA().inputs if i.id == "model").options
    assert "LLM/tiny-qwen3-vl" in options
    with pytest.raises(InputError, match="not one of"):
        loader.execute("LLM/tiny-qwen3-vl", "fp8", "cpu", "none")
    (tmp_path / "llm" / "runs" / "lora").mkdir(parents=True)  # two levels deep, config but no weights
    (tmp_path / "llm" / "runs" / "lora" / "adapter_config.json").write_text("{}")
    loras = next(i for i in loader.GET_SCHEMA().inputs if i.id == "lora").options
    assert loras[0] == "none" and "LLM/runs/lora" in loras
    with pytest.raises(ModelNotFoundError, match="adapter_model.safetensors"):
        loader.execute("LLM/tiny-qwen3-vl", "auto", "cpu", "LLM/runs/lora")
    vlm = loader.execute("LLM/tiny-qwen3-vl", "auto", "cpu", "none")[0]
    assert vlm.family == "qwen3_vl" and vlm.model.dtype == torch.float32
    refs = torch.rand(1, 40, 36, 3, generator=torch.Generator().manual_seed(0))
    args = dict(instruction="", task="age", k=0, seed=1, max_new_tokens=16, unload_after=True)
    prompt, source = enricher.execute(vlm, images=refs, image2=refs, **args)
    assert (prompt, source) == (static_prompt("age", 2), "static")  # a random model cannot pass the validator
    assert enricher.execute(vlm, images=refs, image2=refs, **args)[0] == prompt
    with pytest.raises(InputError, match="No reference images"):
        enricher.execute(vlm, **args)
