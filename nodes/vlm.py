"""Prompt-enricher nodes (paper §3.2, M_P): load a Qwen2.5-VL / Qwen3-VL and write the prompt from the references.

Model folders: a Hugging Face model folder (config.json + *.safetensors + tokenizer/processor files) inside
ComfyUI's ``models/LLM`` or ``models/text_encoders``. A LoRA from ``train/prompt_dpo.py`` (a folder with
adapter_config.json) is found inside ``models/LLM`` or ``models/loras``, up to two levels deep.
The work is done by ``idglow_core.prompting`` (``load_vlm``, ``enrich_prompt_from_tensors``).
"""
from __future__ import annotations

import logging
import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from idglow_core.errors import InputError
from idglow_core.prompting import TASKS, EnrichConfig, enrich_prompt_from_tensors, load_vlm

from ._comfy import CATEGORY, reference_image_inputs
from ._convert import check_choice

log = logging.getLogger("idglow")

VLMType = io.Custom("IDGLOW_VLM")
MODEL_ROOTS = ("LLM", "text_encoders")
LORA_ROOTS = ("LLM", "loras")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")
NO_MODEL = "(no VLM folder found in models/LLM)"

if "LLM" not in folder_paths.folder_names_and_paths:  # models/LLM is where VLM packs keep HF folders
    folder_paths.add_model_folder_path("LLM", os.path.join(folder_paths.models_dir, "LLM"))


def _walk(root: str, marker: str, depth: int):
    """(relative name, full path) of the sub-folders of ``root``, up to ``depth`` levels, that hold ``marker``."""
    level = [(root, "")]
    for _ in range(depth):
        nxt = []
        for path, rel in level:
            subs = sorted(d for d in os.listdir(path) if not d.startswith(".")) if os.path.isdir(path) else []
            for d in subs:
                full, name = os.path.join(path, d), f"{rel}/{d}" if rel else d
                if os.path.isdir(full):
                    nxt.append((full, name))
                    if os.path.isfile(os.path.join(full, marker)):
                        yield name, full
        level = nxt


def _folders(roots: tuple[str, ...], marker: str, depth: int = 1) -> dict[str, str]:
    """'root/sub[/sub]' -> full path, for each folder in ComfyUI's ``roots`` model folders holding ``marker``."""
    found: dict[str, str] = {}
    for root_name in (r for r in roots if r in folder_paths.folder_names_and_paths):
        for root in folder_paths.get_folder_paths(root_name):
            for name, full in _walk(root, marker, depth):
                found.setdefault(f"{root_name}/{name}", full)
    return found


class IdGlowVLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        models = list(_folders(MODEL_ROOTS, "config.json")) or [NO_MODEL]
        loras = ["none", *_folders(LORA_ROOTS, "adapter_config.json", depth=2)]
        return io.Schema(
            node_id="IdGlowVLMLoader", display_name="IdGlow VLM Loader", category=CATEGORY,
            description="Loads the prompt-enricher VLM (Qwen2.5-VL or Qwen3-VL, Hugging Face folder in models/LLM "
                        "or models/text_encoders) and optionally merges a LoRA trained with train/prompt_dpo.py.",
            inputs=[
                io.Combo.Input("model", options=models, default=models[0],
                               tooltip="A Qwen2.5-VL / Qwen3-VL model folder (config.json + safetensors), e.g. "
                                       "models/LLM/Qwen3-VL-8B-Instruct."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Weight precision: auto = the model's own (bf16 for Qwen VL); fp32 on CPU."),
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="auto = ComfyUI's compute device. The enricher can move it to CPU after use."),
                io.Combo.Input("lora", options=loras, default="none",
                               tooltip="Optional prompt-alignment LoRA folder (adapter_config.json) from "
                                       "train/prompt_dpo.py, in models/LLM or models/loras."),
            ],
            outputs=[VLMType.Output(display_name="vlm", tooltip="Connect to IdGlow Prompt Enricher.")])

    @classmethod
    def execute(cls, model: str, dtype: str, device: str, lora: str) -> io.NodeOutput:
        check_choice("dtype", dtype, DTYPES)
        check_choice("device", device, DEVICES)
        models, loras = _folders(MODEL_ROOTS, "config.json"), _folders(LORA_ROOTS, "adapter_config.json", depth=2)
        if model not in models:
            raise InputError(f"VLM '{model}' is not a model folder in {list(MODEL_ROOTS)}. Put a Qwen2.5-VL or "
                             f"Qwen3-VL folder into {folder_paths.get_folder_paths('LLM')} and refresh the page.")
        if lora != "none" and lora not in loras:
            raise InputError(f"LoRA '{lora}' was not found. Put the folder written by train/prompt_dpo.py "
                             f"(<output_dir>/lora) into models/LLM or models/loras, refresh, or pick 'none'.")
        if device == "auto":
            device = str(comfy.model_management.get_torch_device())
        if dtype == "auto" and device == "cpu":
            dtype = "fp32"
        return io.NodeOutput(load_vlm(models[model], dtype=dtype, device=device,
                                      lora=None if lora == "none" else loras[lora]))


class IdGlowPromptEnricher(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowPromptEnricher", display_name="IdGlow Prompt Enricher", category=CATEGORY,
            description="Writes a precise prompt from the reference portraits and your instruction: each person "
                        "named as Picture N with position, appearance, lighting and interaction (paper §3.2). If "
                        "the VLM's answer misses a person or the task, it retries once, then uses the static template.",
            inputs=[
                VLMType.Input("vlm", tooltip="From IdGlow VLM Loader."),
                *reference_image_inputs("A batch of reference portraits (one person each), Picture 1 first.",
                                        "Reference portrait {i}, after those of 'images'."),
                io.String.Input("instruction", multiline=True, default="A natural group photo in a sunny park.",
                                tooltip="What the photo should show (scene, mood, activity)."),
                io.Combo.Input("task", options=list(TASKS), default="group",
                               tooltip="group = direct group fusion; age = the same people as young children."),
                io.Int.Input("k", default=0, min=0, max=16,
                             tooltip="Number of people; 0 = one per connected reference image."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the sampled retry (the first answer is greedy). Same seed, same prompt."),
                io.Int.Input("max_new_tokens", default=300, min=16, max=2048,
                             tooltip="Longest prompt the VLM may write, in tokens."),
                io.Boolean.Input("unload_after", default=True,
                                 tooltip="Move the VLM to CPU after writing, freeing GPU memory for the DiT."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="Connect to the text encoder's prompt."),
                     io.String.Output(display_name="source",
                                      tooltip="vlm, vlm_retry or static (the template fallback was used).")])

    @classmethod
    def validate_inputs(cls, task: str = "group", **kwargs) -> bool | str:
        return True if task in TASKS else f"task '{task}' is not one of {list(TASKS)}"

    @classmethod
    def execute(cls, vlm, instruction: str, task: str, k: int, seed: int, max_new_tokens: int,
                unload_after: bool, images=None, image1=None, image2=None, image3=None,
                image4=None) -> io.NodeOutput:
        check_choice("task", task, TASKS)
        refs = [images, image1, image2, image3, image4]
        if all(r is None for r in refs):
            raise InputError("No reference images are connected. Connect a batch to 'images' or portraits to "
                             "'image1'..'image4' (one person each, in the order the prompt names them).")
        vlm.model.to(vlm.load_device)  # back from the CPU if an earlier run parked it there
        try:
            result = enrich_prompt_from_tensors(vlm, refs, instruction, task, k=int(k), seed=int(seed),
                                                config=EnrichConfig(max_new_tokens=int(max_new_tokens)))
        finally:
            if unload_after and vlm.device.type != "cpu":  # park on the CPU, free GPU memory for the DiT
                vlm.model.to("cpu")
                comfy.model_management.soft_empty_cache()
        log.info("IdGlow Prompt Enricher (%s): %s", result.source, result.prompt)
        return io.NodeOutput(result.prompt, result.source)


NODES = [IdGlowVLMLoader, IdGlowPromptEnricher]
