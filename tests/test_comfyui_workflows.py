"""The shared workflows against a real ComfyUI (``COMFYUI_DIR``; skipped with a printed reason when unset):
they match what ``workflows/_build.py`` makes from the current schemas, convert to API prompts that pass
ComfyUI's ``validate_prompt`` except for model/image files this machine lacks, and ComfyUI serves them as the
pack's templates."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import comfy_helpers as ch

WORKFLOWS = sorted(p.name for p in (ch.REPO / "workflows").glob("*.json"))
TASK1, TASK2, SCORING = "IdGlow group photo (Task 1).json", "IdGlow group as children (Task 2).json", \
    "IdGlow FaceSim score.json"
TRAINING_FREE = "IdGlow training-free identity (no adapter).json"
# Inputs naming files a user supplies (model files, input images): absent here, so these errors are expected.
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "adapter_name", "image", "model"}
FILE_ERRORS = {"value_not_in_list", "custom_validation_failed"}  # the latter: LoadImage's "Invalid image file"


@pytest.fixture(scope="module")
def info():
    ch.boot_comfy()
    return ch.object_info()


def _load(name: str) -> dict:
    return json.loads((ch.REPO / "workflows" / name).read_text(encoding="utf-8"))


def test_committed_workflows_match_the_builder(info):
    built = ch.workflow_builder().build_all(info)
    assert sorted(built) == sorted(WORKFLOWS)
    for name, workflow in built.items():
        assert _load(name) == json.loads(ch.workflow_builder().dumps(workflow)), (
            f"workflows/{name} is stale: run `COMFYUI_DIR=... python workflows/_build.py`")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_converts_and_validates_except_missing_files(info, name):
    workflow = _load(name)
    prompt, problems = ch.ui_to_api(workflow, info)
    assert problems == []
    types = {p["class_type"] for p in prompt.values()}
    assert {"IdGlowFaceAnalyzerLoader", "IdGlowMultiIDEncode"} <= types
    if "Task" in name:
        assert {"UNETLoader", "CLIPLoader", "VAELoader", "TextEncodeQwenImageEditPlus", "KSampler", "VAEDecode",
                "SaveImage", "IdGlowApply", "IdGlowSchedule", "IdGlowStaticPrompt", "IdGlowAdapterLoader"} <= types
        sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
        assert sampler["widgets_values"][:2] == [42, "fixed"]      # seed + the editor's control_after_generate
        assert not any(p["class_type"] == "IdGlowPromptEnricher" for p in prompt.values())  # muted: not queued
        methods = {k: p for k, p in prompt.items() if p["class_type"] == "FluxKontextMultiReferenceLatentMethod"}
        ksampler = next(p for p in prompt.values() if p["class_type"] == "KSampler")["inputs"]
        assert {ksampler["positive"][0], ksampler["negative"][0]} == set(methods)   # 2511 as trained:
        assert all(m["inputs"]["reference_latents_method"] == "index_timestep_zero" for m in methods.values())
    elif name == TRAINING_FREE:   # no adapter; guidance bypassed, so the shifted base MODEL feeds the seed search
        assert "IdGlowAdapterLoader" not in types and "IdGlowApply" not in types
        search = next(p for p in prompt.values() if p["class_type"] == "IdGlowSeedSearch")["inputs"]
        assert prompt[search["model"][0]]["class_type"] == "ModelSamplingAuraFlow"
        assert "IdGlowIdentityGuidance" not in types and any(
            n["type"] == "IdGlowIdentityGuidance" and n["mode"] == 4 for n in workflow["nodes"])
        assert {"IdGlowFaceSim", "PreviewAny", "SaveImage"} <= types
    else:   # scoring: every FaceSim output on a display node; the aesthetic branch bypassed (not queued)
        facesim = next(k for k, p in prompt.items() if p["class_type"] == "IdGlowFaceSim")
        shown = {p["inputs"]["source"][1] for p in prompt.values()
                 if p["class_type"] == "PreviewAny" and p["inputs"].get("source", [None])[0] == facesim}
        assert shown == {0, 1, 2}
        assert "IdGlowAestheticScore" not in types and any(n["type"] == "IdGlowAestheticScore" and n["mode"] == 4
                                                           for n in workflow["nodes"])
    ok, errors = ch.validate(prompt)
    unexpected = {nid: [e for e in errs if not (e[0] in FILE_ERRORS and e[1] in FILE_INPUTS)]
                  for nid, errs in errors.items()}
    assert not any(unexpected.values()), unexpected
    adapter = [e for nid, errs in errors.items() for e in errs if e[1] == "adapter_name"]
    assert adapter == ([("custom_validation_failed", "adapter_name")] if "Task" in name else [])
    assert any(errors.values()), "expected only the missing model files to fail validation here"


def test_static_schedule_and_prompt_wiring(info):
    task2 = ch.ui_to_api(_load(TASK2), info)[0]
    schedule = next(p for p in task2.values() if p["class_type"] == "IdGlowSchedule")["inputs"]
    assert (schedule["preset"], schedule["lo"], schedule["hi"]) == ("gate", 0.3, 0.6)   # Eq. 5 window
    static = next(k for k, p in task2.items() if p["class_type"] == "IdGlowStaticPrompt")
    positive = next(p for p in task2.values() if p["_meta"]["title"] == "Positive")["inputs"]
    assert positive["prompt"] == [static, 0] and task2[static]["inputs"]["task"] == "age"


def _editor_template(name: str) -> Path:
    """A template from the workflow-templates package ComfyUI pins: one ``templates/`` folder up to 0.1.x, split
    into ``comfyui_workflow_templates_media_*`` bundles (found through ``get_asset_path``) from 0.7."""
    templates = pytest.importorskip("comfyui_workflow_templates")
    if hasattr(templates, "get_asset_path"):
        return Path(templates.get_asset_path(name, f"{name}.json"))
    from importlib.resources import files
    return Path(str(files(templates) / "templates" / f"{name}.json"))


def test_converter_handles_a_template_saved_by_the_real_editor(info):
    # The 2509 edit template of older packages; newer ones wrap it in a subgraph (which this test converter does
    # not expand), so there the Qwen-Image ControlNet template, saved flat by the editor, stands in.
    for name in ("image_qwen_image_edit_2509", "image_qwen_image_controlnet_patch"):
        workflow = json.loads(_editor_template(name).read_text(encoding="utf-8"))
        if not workflow.get("definitions", {}).get("subgraphs"):
            break
    prompt, problems = ch.ui_to_api(workflow, info, older_nodes_ok=True)
    assert problems == [] and len(prompt) > 8
    ok, errors = ch.validate(prompt)
    assert all(e[0] in FILE_ERRORS and e[1] in FILE_INPUTS | {"lora_name", "name"}
               for errs in errors.values() for e in errs), errors  # "name": the ModelPatchLoader file


def test_comfyui_lists_and_serves_the_workflows_as_templates(info):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    pack = ch.boot_comfy()["custom_nodes"] / ch.PACK_DIR_NAME
    app, routes = web.Application(), web.RouteTableDef()
    CustomNodeManager().add_routes(routes, app, [(ch.PACK_DIR_NAME, str(pack))])
    app.add_routes(routes)

    async def fetch():
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            served = await client.get(f"/api/workflow_templates/{ch.PACK_DIR_NAME}/{WORKFLOWS[0]}")
            return listing, served.status, await served.json(content_type=None)

    listing, status, body = asyncio.run(fetch())
    assert sorted(listing[ch.PACK_DIR_NAME]) == sorted(w[:-5] for w in WORKFLOWS)
    # ComfyUI serves a pack's templates from the first folder named example_workflows/example/examples/
    # workflow/workflows; the pack therefore has no other folder with one of those names.
    assert status == 200 and body == _load(WORKFLOWS[0])


def test_nodes_md_is_generated_from_the_current_schemas(info):
    nodes = ch.pack_submodule("nodes").all_nodes()
    text = ch.workflow_builder().nodes_markdown(nodes)
    assert (ch.REPO / "NODES.md").read_text(encoding="utf-8") == text, (
        "NODES.md is stale: run `COMFYUI_DIR=... python workflows/_build.py`")
    for cls in nodes:  # every node and every one of its inputs is documented
        schema = cls.GET_SCHEMA()
        section = text.split(f"(`{schema.node_id}`)")[1].split("\n## ")[0]
        assert all(f"| `{i.id}` |" in section for i in schema.inputs), schema.node_id
