"""Writes the shared IdGlow workflows (ComfyUI UI/litegraph format, what the editor's "Save" produces) and NODES.md.

The widget order of every node comes from the node schemas (``/object_info`` of a running ComfyUI), so the files
stay consistent with the nodes. Regenerate after changing a node's inputs::

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python workflows/_build.py

``tests/test_comfyui_workflows.py`` rebuilds them in memory and fails when a committed file differs.
ComfyUI lists ``<pack>/workflows/*.json`` (also ``example_workflows/``) as the pack's templates.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

UNET = "qwen_image_edit_2511_bf16.safetensors"
CLIP = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
ADAPTER = "idglow_qwen_image_edit_2511.safetensors"
MODEL_NOTE = f"""IdGlow needs these files (folders are inside ComfyUI/models/):
- diffusion_models/{UNET}  (Qwen-Image-Edit-2511, Comfy-Org repack)
- text_encoders/{CLIP}
- vae/{VAE}
- idglow/{ADAPTER}  (an IdGlow adapter: trained with train/sft.py, or a released one)
- insightface/models/buffalo_l/det_10g.onnx + w600k_r50.onnx  (insightface buffalo_l; without them the
  analyzer falls back to the offline dlib backend, whose 128-d embeddings do not fit a 512-d adapter)
- aesthetic/  sac+logos+ava1-l14-linearMSE.pth + a CLIP ViT-L/14 folder (scoring workflow only)
Reference portraits go in ComfyUI/input/: one person per image, Picture 1 = leftmost person."""


def _spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_slots(info: dict) -> list[tuple[str | None, list]]:
    """``[(input name, spec)]`` in ``widgets_values`` order; name None marks a UI-only extra value
    (``control_after_generate`` after seeds, the upload button value of LoadImage), as the frontend saves them."""
    slots = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            opts = _spec_options(spec)
            if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            slots.append((name, spec))
            control = opts.get("control_after_generate")
            if (spec[0] == "INT" and (control if control is not None else name in ("seed", "noise_seed"))) or \
                    (spec[0] != "INT" and control):
                slots.append((None, "control_after_generate"))
            if any(k.endswith("_upload") and v for k, v in opts.items()):
                slots.append((None, "upload"))
    return slots


def default_value(spec):
    opts = _spec_options(spec)
    if "default" in opts:
        return opts["default"]
    choices = spec[0] if isinstance(spec[0], list) else opts.get("options")
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0], "")


class Graph:
    """A UI-format workflow under construction: ``add`` nodes with widget values by name, ``link`` outputs to inputs."""

    def __init__(self, object_info: dict):
        self.info, self.nodes, self.links, self.groups = object_info, [], [], []

    def group(self, title: str, bounding: tuple[int, int, int, int]) -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": "#3f789e", "font_size": 24, "flags": {}})

    def add(self, node_type: str, pos: tuple[int, int], widgets: dict | None = None, title: str | None = None,
            size: tuple[int, int] = (320, 130), mode: int = 0) -> dict:
        """mode: 0 = active, 2 = muted (kept in the file, not run), 4 = bypassed."""
        info = self.info[node_type]
        widgets = dict(widgets or {})
        values, names = [], set()
        for name, spec in widget_slots(info):
            if name is None:
                values.append("fixed" if spec == "control_after_generate" else "image")
                continue
            names.add(name)
            values.append(widgets.pop(name) if name in widgets else default_value(spec))
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}; its widgets are {sorted(names)}")
        sockets = [{"name": n, "type": s[0] if isinstance(s[0], str) else "COMBO", "link": None}
                   for sec in ("required", "optional")
                   for n, s in ((n, info["input"].get(sec, {})[n]) for n in info.get("input_order", {}).get(sec, []))
                   if n not in names]
        out_names = info.get("output_name") or info["output"]
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": mode, "inputs": sockets,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(out_names, info["output"]))],
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[int, int], size: tuple[int, int] = (420, 260),
             title: str = "Models and folders") -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "title": title}
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else [o["name"] for o in src["outputs"]].index(output)
        kind = src["outputs"][slot]["type"]
        inputs = [i["name"] for i in dst["inputs"]]
        if input_name not in inputs:  # a widget turned into a socket, as the editor does when a link lands on it
            dst["inputs"].append({"name": input_name, "type": kind, "widget": {"name": input_name}, "link": None})
            inputs.append(input_name)
        link_id = len(self.links) + 1
        target = inputs.index(input_name)
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def to_json(self, uid: str) -> dict:
        return {"id": uid, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}


def _generation(object_info: dict, task: str, uid: str) -> dict:
    """Task 1 ('group') or Task 2 ('age'): k = 2 portraits -> IdGlow-patched Qwen-Image-Edit -> one image."""
    g = Graph(object_info)
    unet = g.add("UNETLoader", (0, 0), {"unet_name": UNET, "weight_dtype": "default"})
    clip = g.add("CLIPLoader", (0, 160), {"clip_name": CLIP, "type": "qwen_image", "device": "default"})
    vae = g.add("VAELoader", (0, 320), {"vae_name": VAE})
    portraits = [g.add("LoadImage", (0, 460 + 340 * i), {"image": f"person{i + 1}.png"}, title=f"Picture {i + 1}",
                       size=(320, 320)) for i in range(2)]
    shift = g.add("ModelSamplingAuraFlow", (380, 0), {"shift": 3.1})
    analyzer = g.add("IdGlowFaceAnalyzerLoader", (380, 160), {"backend": "auto", "provider": "auto", "det_size": 640})
    encode = g.add("IdGlowMultiIDEncode", (380, 340), {"face": "largest", "face_index": 0})
    adapter = g.add("IdGlowAdapterLoader", (380, 560), {"adapter_name": ADAPTER})
    schedule = g.add("IdGlowSchedule", (380, 700), {"preset": "anneal" if task == "group" else "gate", "tau": 0.3,
                                                    "lo": 0.3, "hi": 0.6}, size=(320, 260))
    apply = g.add("IdGlowApply", (760, 0), {"weight": 1.0})
    prompt = g.add("IdGlowStaticPrompt", (760, 160), {"task": task, "subjects": 2})
    positive = g.add("TextEncodeQwenImageEditPlus", (760, 320), {"prompt": ""}, title="Positive", size=(400, 200))
    negative = g.add("TextEncodeQwenImageEditPlus", (760, 560), {"prompt": ""}, title="Negative", size=(400, 130))
    latent = g.add("EmptySD3LatentImage", (760, 740), {"width": 1344, "height": 896, "batch_size": 1})
    sampler = g.add("KSampler", (1200, 0), {"seed": 42, "steps": 40, "cfg": 4.0, "sampler_name": "euler",
                                            "scheduler": "simple", "denoise": 1.0}, size=(320, 270))
    decode = g.add("VAEDecode", (1200, 320))
    save = g.add("SaveImage", (1560, 0), {"filename_prefix": f"idglow_{'task1' if task == 'group' else 'task2'}"},
                 size=(500, 560))
    faces_preview = g.add("PreviewImage", (1200, 440), title="Aligned faces (identity order)", size=(320, 200))
    plot_preview = g.add("PreviewImage", (1200, 680), title="Omega(t)", size=(320, 200))
    g.note(MODEL_NOTE + ("\nTask 1: anneal schedule (Eq. 4)." if task == "group" else
                         "\nTask 2: gate schedule on t in [0.3, 0.6] (Eq. 5)."), (1560, 620), size=(500, 420))
    g.link(unet, 0, shift, "model")
    g.link(shift, 0, apply, "model")
    g.link(analyzer, 0, encode, "analyzer")
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", encode, f"image{i + 1}")
        g.link(p, "IMAGE", positive, f"image{i + 1}")
        g.link(p, "IMAGE", negative, f"image{i + 1}")
    g.link(adapter, 0, apply, "adapter")
    g.link(encode, "ids", apply, "ids")
    g.link(schedule, "schedule", apply, "schedule")
    g.link(encode, "ids", prompt, "ids")
    g.link(prompt, "prompt", positive, "prompt")
    for enc in (positive, negative):
        g.link(clip, 0, enc, "clip")
        g.link(vae, 0, enc, "vae")
    g.link(apply, 0, sampler, "model")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    g.link(encode, "aligned_faces", faces_preview, "images")
    g.link(schedule, "plot", plot_preview, "images")
    if "IdGlowPromptEnricher" in object_info:
        _dynamic_prompt(g, task, portraits)
    return g.to_json(uid)


def _dynamic_prompt(g: Graph, task: str, portraits: list[dict]) -> None:
    """The paper's dynamic prompt (M_P, §3.2) as a muted, optional branch next to the static template."""
    vlm = g.add("IdGlowVLMLoader", (0, 1200), {"model": "LLM/Qwen2.5-VL-7B-Instruct", "lora": "none"}, mode=2)
    enrich = g.add("IdGlowPromptEnricher", (380, 1200), {"task": task, "k": 0, "seed": 0}, size=(400, 300), mode=2)
    g.link(vlm, 0, enrich, "vlm")
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", enrich, f"image{i + 1}")
    g.note("Dynamic prompt (optional): put a Qwen2.5-VL / Qwen3-VL folder in models/LLM, unmute these two nodes "
           "(Ctrl+M) and drag the enricher's 'prompt' output onto Positive's prompt in place of IdGlow Static "
           "Prompt.", (820, 1200), size=(360, 200), title="Dynamic prompt")
    g.group("Dynamic prompt (optional, muted)", (-20, 1140, 1220, 400))


def _scoring(object_info: dict, uid: str) -> dict:
    """FaceSim (Hungarian-matched, Eq. 2) and the aesthetic score of a generated image against 2 references."""
    g = Graph(object_info)
    generated = g.add("LoadImage", (0, 0), {"image": "idglow_task1_00001_.png"}, title="Generated image",
                      size=(320, 320))
    portraits = [g.add("LoadImage", (0, 360 + 340 * i), {"image": f"person{i + 1}.png"}, title=f"Picture {i + 1}",
                       size=(320, 320)) for i in range(2)]
    analyzer = g.add("IdGlowFaceAnalyzerLoader", (380, 0), {"backend": "auto", "provider": "auto", "det_size": 640})
    encode = g.add("IdGlowMultiIDEncode", (380, 180), {"face": "largest", "face_index": 0})
    facesim = g.add("IdGlowFaceSim", (760, 0), size=(400, 300))
    aesthetic = g.add("IdGlowAestheticScore", (760, 340), {"model": "."}, size=(400, 160))
    annotated = g.add("PreviewImage", (1200, 0), title="Matched faces", size=(420, 420))
    g.note(MODEL_NOTE, (1200, 460))
    g.link(analyzer, 0, encode, "analyzer")
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", encode, f"image{i + 1}")
    g.link(analyzer, 0, facesim, "analyzer")
    g.link(generated, "IMAGE", facesim, "images")
    g.link(encode, "ids", facesim, "ids")
    g.link(generated, "IMAGE", aesthetic, "images")
    g.link(facesim, "annotated", annotated, "images")
    return g.to_json(uid)


def build_all(object_info: dict) -> dict[str, dict]:
    """``{file name: UI workflow}`` for every shared workflow."""
    return {
        "idglow_task1_group_fusion.json": _generation(object_info, "group", "1d61057a-0000-4000-8000-000000000001"),
        "idglow_task2_age_transform.json": _generation(object_info, "age", "1d61057a-0000-4000-8000-000000000002"),
        "idglow_score_facesim.json": _scoring(object_info, "1d61057a-0000-4000-8000-000000000003"),
    }


NODES_HEADER = """# IdGlow nodes

Generated from the node schemas by `workflows/_build.py` (do not edit by hand; a test compares). All nodes are in
the **IdGlow** menu category. Types in capitals are ComfyUI socket types; `IDGLOW_*` types connect IdGlow nodes.
Dropdown values are checked by the nodes themselves (ComfyUI does not check V3 dropdowns).

Model folders (inside `ComfyUI/models/`; extra locations via `extra_model_paths.yaml`, e.g. `insightface: /data/if`):

| folder | files |
|---|---|
| `insightface/` | `models/buffalo_l/det_10g.onnx` + `w600k_r50.onnx` (or `buffalo_l/...`) |
| `idglow/` | IdGlow adapters, `*.safetensors` |
| `aesthetic/` | `sac+logos+ava1-l14-linearMSE.pth` + a CLIP ViT-L/14 folder (HF format), directly or per sub-folder |
| `LLM/` | a Qwen2.5-VL / Qwen3-VL folder for the prompt enricher |

Shared workflows: `workflows/idglow_task1_group_fusion.json`, `workflows/idglow_task2_age_transform.json`,
`workflows/idglow_score_facesim.json` (drag a file onto the ComfyUI canvas).

Tests against a real ComfyUI (`tests/test_comfyui*.py`, skipped when `COMFYUI_DIR` is unset) need a ComfyUI
checkout and a Python with its requirements plus IdGlow's: `pip install -r $COMFYUI_DIR/requirements.txt requests
-r requirements.txt` (insightface with `--no-deps`), then `COMFYUI_DIR=/path/to/ComfyUI python -m pytest -q
tests/test_comfyui.py tests/test_comfyui_workflows.py`. On a CPU-only torch, PyPI's torchvision and torchaudio are
CUDA builds: ComfyUI needs `torchvision` importable (a CPU build, or the op-schema shim in the project notes) and
`transformers` breaks while a CUDA-only `torchaudio` is installed (uninstall it; only ComfyUI's audio nodes use it).
After changing a node's inputs, regenerate the workflows and this file:
`COMFYUI_DIR=/path/to/ComfyUI python workflows/_build.py`.
"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# Dropdowns listing the user's model files: their values depend on the machine, so the docs describe them.
FILE_LISTS = {("IdGlowAdapterLoader", "adapter_name"): "a file in models/idglow",
              ("IdGlowAestheticScore", "model"): "a folder in models/aesthetic ('.' = the folder itself)",
              ("IdGlowVLMLoader", "model"): "a model folder in models/LLM or models/text_encoders",
              ("IdGlowVLMLoader", "lora"): "`none` or a LoRA folder in models/LLM or models/loras"}


def _input_detail(node_id: str, inp) -> str:
    """Default, range or options of a V3 input, for the docs table."""
    if (node_id, inp.id) in FILE_LISTS:
        return FILE_LISTS[(node_id, inp.id)]
    bits = []
    options = getattr(inp, "options", None)
    if options:
        bits.append("one of " + ", ".join(f"`{o}`" for o in options))
    for key, label in (("default", "default"), ("min", "min"), ("max", "max")):
        value = getattr(inp, key, None)
        if value is not None:
            bits.append(f"{label} `{value}`")
    if getattr(inp, "optional", False):
        bits.append("optional")
    return "; ".join(bits)


def nodes_markdown(node_classes: list) -> str:
    """NODES.md: one section per node with its inputs and outputs, from the V3 schemas."""
    parts = [NODES_HEADER]
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        parts.append(f"## {schema.display_name} (`{schema.node_id}`)\n\n{schema.description}\n")
        parts.append("| input | type | values | what it does |\n|---|---|---|---|")
        for inp in schema.inputs:
            parts.append(f"| `{inp.id}` | {inp.get_io_type()} | {_cell(_input_detail(schema.node_id, inp))} | {_cell(inp.tooltip or '')} |")
        parts.append("\n| output | type | what it is |\n|---|---|---|")
        for out in schema.outputs:
            parts.append(f"| `{out.display_name or out.id}` | {out.get_io_type()} | {_cell(out.tooltip or '')} |")
        parts.append("")
    return "\n".join(parts)


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import comfy_helpers  # boots ComfyUI from $COMFYUI_DIR and loads this pack

    info = comfy_helpers.object_info()
    for name, workflow in build_all(info).items():
        (HERE / name).write_text(dumps(workflow), encoding="utf-8")
        print(f"wrote workflows/{name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")
    docs = nodes_markdown(comfy_helpers.pack_submodule("nodes").all_nodes())
    (HERE.parent / "NODES.md").write_text(docs, encoding="utf-8")
    print(f"wrote NODES.md ({docs.count(chr(10) + '## ')} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
