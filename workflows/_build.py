"""Writes the shared IdGlow workflows (ComfyUI UI/litegraph format, what the editor's "Save" produces) and NODES.md.

Nodes are laid out in columns of titled groups at the sizes the real frontend gives them (``node_sizes.json``,
measured by ``workflows/_measure.py`` in headless Chromium, which also makes the templates' thumbnails and the
README's screenshots).

The widget order of every node comes from the node schemas (``/object_info`` of a running ComfyUI), so the files
stay consistent with the nodes. Regenerate after changing a node's inputs::

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python workflows/_build.py     # recorded sizes
    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python workflows/_measure.py   # measure them anew

``tests/test_comfyui_workflows.py`` rebuilds them in memory and fails when a committed file differs.
ComfyUI lists ``<pack>/workflows/*.json`` (also ``example_workflows/``) as the pack's templates.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    """A module of this folder (workflows/ is data that ComfyUI serves, not a package)."""
    key = f"idglow_workflow{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


_graph = _sibling("_graph")
# The layout's names, used here and by _measure.py and the tests through this module.
Graph, widget_slots, default_value, dumps = _graph.Graph, _graph.widget_slots, _graph.default_value, _graph.dumps
measured_sizes, size_key, SIZES_FILE = _graph.measured_sizes, _graph.size_key, _graph.SIZES_FILE
VIEW, MIN_SCALE, GROUP_HEADER = _graph.VIEW, _graph.MIN_SCALE, _graph.GROUP_HEADER

UNET = "qwen_image_edit_2511_bf16.safetensors"
CLIP = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
ADAPTER = "idglow_qwen_image_edit_2511.safetensors"
MODEL_NOTE = f"""IdGlow needs these files (folders are inside ComfyUI/models/); ComfyUI 0.5 or newer:
- diffusion_models/{UNET}  (Qwen-Image-Edit-2511, Comfy-Org repack)
- text_encoders/{CLIP}
- vae/{VAE}
- idglow/{ADAPTER}: an IdGlow adapter. None ships: train one with train/sft.py (README, Training) and copy
  final/idglow_adapter.safetensors here. Without one, use the training-free workflow.
- insightface/models/buffalo_l/det_10g.onnx + w600k_r50.onnx  (insightface buffalo_l; without them the
  analyzer falls back to the offline dlib backend, whose 128-d embeddings do not fit a 512-d adapter)
Reference portraits go in ComfyUI/input/: one person per image, Picture 1 = leftmost person."""


MODEL_URLS = {
    UNET: ("diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/"
                               f"diffusion_models/{UNET}"),
    CLIP: ("text_encoders", "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/"
                            f"text_encoders/{CLIP}"),
    VAE: ("vae", f"https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/{VAE}"),
}


def _models(name: str) -> list[dict]:
    directory, url = MODEL_URLS[name]
    return [{"name": name, "url": url, "directory": directory}]


def _reference_portraits(g: Graph, count: int = 2) -> list[dict]:
    """LoadImage nodes sized to show a portrait once one is loaded (the frontend grows them to fit the preview)."""
    return [g.add("LoadImage", {"image": f"person{i + 1}.png"}, title=f"Picture {i + 1}", size=(320, 440))
            for i in range(count)]


def _identities(g: Graph) -> tuple[list[dict], dict, dict]:
    """The reference portraits, the face analyzer ('auto': insightface when installed, else dlib) and the
    Multi-ID encoder they feed, in reference order."""
    portraits = _reference_portraits(g)
    analyzer = g.add("IdGlowFaceAnalyzerLoader", {"backend": "auto", "provider": "auto", "det_size": 640})
    encode = g.add("IdGlowMultiIDEncode", {"face": "largest", "face_index": 0})
    g.link(analyzer, 0, encode, "analyzer")
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", encode, f"image{i + 1}")
    return portraits, analyzer, encode


def _model_loaders(g: Graph) -> tuple[dict, dict, dict]:
    """The native Qwen-Image-Edit-2511 loaders (DiT, text encoder, VAE), each offering its file to download."""
    return (g.add("UNETLoader", {"unet_name": UNET, "weight_dtype": "default"}, models=_models(UNET)),
            g.add("CLIPLoader", {"clip_name": CLIP, "type": "qwen_image", "device": "default"}, models=_models(CLIP)),
            g.add("VAELoader", {"vae_name": VAE}, models=_models(VAE)))


def _edit_prompt(g: Graph, task: str, clip: dict, vae: dict, portraits: list[dict], encode: dict) -> list[dict]:
    """The static prompt for the identities, both TextEncodeQwenImageEditPlus (the portraits as Picture 1, 2...)
    and the 2511 reference method on each. Returns the nodes, the last two being the positive / negative
    conditioning for the sampler."""
    prompt = g.add("IdGlowStaticPrompt", {"task": task, "subjects": len(portraits)})
    positive = g.add("TextEncodeQwenImageEditPlus", {"prompt": ""}, title="Positive", size=(400, 160))
    negative = g.add("TextEncodeQwenImageEditPlus", {"prompt": ""}, title="Negative", size=(400, 160))
    # Qwen-Image-Edit-2511 was trained with its reference latents at timestep zero (ComfyUI >= 0.5).
    methods = [g.add("FluxKontextMultiReferenceLatentMethod", {"reference_latents_method": "index_timestep_zero"},
                     title=f"Reference method ({which})") for which in ("positive", "negative")]
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", positive, f"image{i + 1}")
        g.link(p, "IMAGE", negative, f"image{i + 1}")
    g.link(encode, "ids", prompt, "ids")
    g.link(prompt, "prompt", positive, "prompt")
    for enc, method in zip((positive, negative), methods):
        g.link(clip, 0, enc, "clip")
        g.link(vae, 0, enc, "vae")
        g.link(enc, 0, method, "conditioning")
    return [prompt, positive, negative, *methods]


def _generation(object_info: dict, task: str, uid: str) -> dict:
    """Task 1 ('group') or Task 2 ('age'): k = 2 portraits -> IdGlow-patched Qwen-Image-Edit-2511 -> one image."""
    g = Graph(object_info)
    unet, clip, vae = _model_loaders(g)
    shift = g.add("ModelSamplingAuraFlow", {"shift": 3.1})
    portraits, analyzer, encode = _identities(g)
    # The two previews are muted: an active output that needs no model would let ComfyUI run the graph partly when
    # the models or the adapter are missing, outlining the failed nodes in red but showing no message; with every
    # active output depending on them, a missing file stops the run with a dialog that says what to do.
    faces_preview = g.add("PreviewImage", title="Aligned faces (muted; Ctrl+M to show)", size=(320, 220), mode=2)
    adapter = g.add("IdGlowAdapterLoader", {"adapter_name": ADAPTER})
    schedule = g.add("IdGlowSchedule", {"preset": "anneal" if task == "group" else "gate", "tau": 0.3,
                                        "lo": 0.3, "hi": 0.6})
    apply = g.add("IdGlowApply", {"weight": 1.0})
    plot_preview = g.add("PreviewImage", title="Omega(t) plot (muted; Ctrl+M to show)", size=(320, 220), mode=2)
    prompt_nodes = _edit_prompt(g, task, clip, vae, portraits, encode)
    latent = g.add("EmptySD3LatentImage", {"width": 1344, "height": 896, "batch_size": 1})
    sampler = g.add("KSampler", {"seed": 42, "steps": 40, "cfg": 4.0, "sampler_name": "euler",
                                 "scheduler": "simple", "denoise": 1.0})
    decode = g.add("VAEDecode")
    save = g.add("SaveImage", {"filename_prefix": f"idglow_{'task1' if task == 'group' else 'task2'}"},
                 size=(400, 400))
    note = g.note(MODEL_NOTE + ("\nTask 1: anneal schedule (Eq. 4)." if task == "group" else
                                "\nTask 2: gate schedule on t in [0.3, 0.6] (Eq. 5)."), "Models and folders",
                  size=(400, 380))
    g.link(unet, 0, shift, "model")
    g.link(shift, 0, apply, "model")
    g.link(adapter, 0, apply, "adapter")
    g.link(encode, "ids", apply, "ids")
    g.link(schedule, "schedule", apply, "schedule")
    g.link(apply, 0, sampler, "model")
    g.link(prompt_nodes[-2], 0, sampler, "positive")
    g.link(prompt_nodes[-1], 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    g.link(encode, "aligned_faces", faces_preview, "images")
    g.link(schedule, "plot", plot_preview, "images")
    models = ("Models", "models", [unet, clip, vae])
    if "IdGlowPromptEnricher" in object_info:
        g.column(models, _dynamic_prompt(g, task, portraits))
    else:
        g.column(models)
    g.column(("Identities", "identities", [tuple(portraits), analyzer, encode, faces_preview]))
    g.column(("IdGlow", "idglow", [adapter, schedule, apply, plot_preview]))
    g.column(("Prompt", "prompt", prompt_nodes))
    g.column(("Sampling", "sampling", [shift, latent, sampler, decode]))
    g.column(("Output", "output", [save, note]))
    return g.to_json(uid)


def _dynamic_prompt(g: Graph, task: str, portraits: list[dict]) -> tuple[str, str, list[dict]]:
    """The paper's dynamic prompt (M_P, §3.2) as a muted, optional branch next to the static template."""
    vlm = g.add("IdGlowVLMLoader", {"model": "LLM/Qwen2.5-VL-7B-Instruct", "lora": "none"}, mode=2)
    enrich = g.add("IdGlowPromptEnricher", {"task": task, "k": 0, "seed": 0}, size=(320, 300), mode=2)
    g.link(vlm, 0, enrich, "vlm")
    for i, p in enumerate(portraits):
        g.link(p, "IMAGE", enrich, f"image{i + 1}")
    note = g.note("Dynamic prompt (optional): put a Qwen2.5-VL / Qwen3-VL folder in models/LLM, unmute these two "
                  "nodes (select them, Ctrl+M) and drag the enricher's 'prompt' output onto Positive's prompt in "
                  "place of IdGlow Static Prompt.", "Dynamic prompt", size=(320, 150))
    return "Dynamic prompt (optional, muted)", "optional", [note, vlm, enrich]


def _scoring(object_info: dict, uid: str) -> dict:
    """FaceSim (Hungarian-matched, Eq. 2) of a generated image against 2 references, every number shown after a
    run; the aesthetic score as an optional, bypassed branch (it needs models a new user does not have)."""
    g = Graph(object_info)
    generated = g.add("LoadImage", {"image": "idglow_task1_00001_.png"}, title="Generated image", size=(320, 440))
    portraits, analyzer, encode = _identities(g)
    facesim = g.add("IdGlowFaceSim", size=(360, 120))
    shown = {name: g.add("PreviewAny", title=title, size=(360, 110 if name != "report" else 240))
             for name, title in (("facesim_strict", "FaceSim (strict)"), ("facesim_matched", "FaceSim (matched)"),
                                 ("report", "FaceSim report"))}
    annotated = g.add("PreviewImage", title="Matched faces", size=(420, 420))
    note = g.note("FaceSim: each reference is matched to one face of the generated image (Hungarian, Eq. 2). "
                  "strict = mean over references (a missing face counts 0); matched = mean over matched pairs. "
                  "The analyzer 'auto' uses insightface buffalo_l (models/insightface) when installed, else the "
                  "offline dlib backend; scores of the two backends are not comparable.", "How to read it",
                  size=(420, 200))
    aesthetic = g.add("IdGlowAestheticScore", {"model": "."}, size=(360, 100), mode=4)
    aes_shown = g.add("PreviewAny", title="Aesthetic score", size=(360, 110), mode=4)
    aes_note = g.note("Optional, bypassed: the LAION aesthetic score needs ComfyUI/models/aesthetic/ with "
                      "sac+logos+ava1-l14-linearMSE.pth and a CLIP ViT-L/14 folder (openai/clip-vit-large-patch14). "
                      "Once they are there, select these two nodes and press Ctrl+B.", "Aesthetic score (optional)",
                      size=(360, 190))
    g.link(analyzer, 0, facesim, "analyzer")
    g.link(generated, "IMAGE", facesim, "images")
    g.link(encode, "ids", facesim, "ids")
    for name, node in shown.items():
        g.link(facesim, name, node, "source")
    g.link(facesim, "annotated", annotated, "images")
    g.link(generated, "IMAGE", aesthetic, "images")
    g.link(aesthetic, "score", aes_shown, "source")
    g.column(("Images", "identities", [generated, tuple(portraits)]))
    g.column(("Identities", "identities", [analyzer, encode]),
             ("Aesthetic (optional, bypassed)", "optional", [aes_note, aesthetic, aes_shown]))
    g.column(("FaceSim", "idglow", [facesim, *shown.values()]))
    g.column(("Output", "output", [annotated, note]))
    return g.to_json(uid)


def _training_free(object_info: dict, uid: str) -> dict:
    """Identity on the base model, no adapter: the native 2511 graph, Hungarian seed search with early pruning
    (N candidates to t_p, the best M finished), identity guidance (bypassed: it needs insightface's ArcFace) and
    the FaceSim of the results shown."""
    g = Graph(object_info)
    unet, clip, vae = _model_loaders(g)
    portraits, analyzer, encode = _identities(g)
    schedule = g.add("IdGlowSchedule", {"preset": "anneal", "tau": 0.3, "lo": 0.3, "hi": 0.6})
    guidance = g.add("IdGlowIdentityGuidance", {"strength": 1.0, "margin": 4}, mode=4)
    guide_note = g.note("Identity guidance (bypassed): moves each step's estimate along the gradient of the "
                        "Hungarian ID loss inside the schedule's window, through the VAE decoder and ArcFace only. "
                        "It needs insightface buffalo_l (det_10g.onnx + w600k_r50.onnx in models/insightface); "
                        "with them, select it and press Ctrl+B. With an IdGlow adapter, put IdGlow Apply before it.",
                        "Identity guidance (optional)", size=(320, 210))
    prompt_nodes = _edit_prompt(g, "group", clip, vae, portraits, encode)
    shift = g.add("ModelSamplingAuraFlow", {"shift": 3.1})
    latent = g.add("EmptySD3LatentImage", {"width": 1344, "height": 896, "batch_size": 1})
    search = g.add("IdGlowSeedSearch", {"seed": 42, "candidates": 8, "keep": 2, "prune_at": 0.6, "steps": 40,
                                        "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple"})
    decode = g.add("VAEDecode")
    search_report = g.add("PreviewAny", title="Seed search report", size=(320, 200))
    save = g.add("SaveImage", {"filename_prefix": "idglow_training_free"}, size=(400, 400))
    facesim = g.add("IdGlowFaceSim", size=(400, 120))
    shown = g.add("PreviewAny", title="FaceSim report", size=(400, 200))
    annotated = g.add("PreviewImage", title="Matched faces", size=(400, 400))
    g.link(unet, 0, shift, "model")
    g.link(shift, 0, guidance, "model")
    for name, src in (("vae", vae), ("ids", encode), ("analyzer", analyzer), ("schedule", schedule)):
        g.link(src, 0, guidance, name)
    g.link(guidance, 0, search, "model")   # bypassed: the shifted MODEL passes straight through
    g.link(prompt_nodes[-2], 0, search, "positive")
    g.link(prompt_nodes[-1], 0, search, "negative")
    g.link(latent, 0, search, "latent_image")
    g.link(vae, 0, search, "vae")
    g.link(encode, "ids", search, "ids")
    g.link(analyzer, 0, search, "analyzer")
    g.link(search, "latent", decode, "samples")
    g.link(search, "report", search_report, "source")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    g.link(analyzer, 0, facesim, "analyzer")
    g.link(decode, 0, facesim, "images")
    g.link(encode, "ids", facesim, "ids")
    g.link(facesim, "report", shown, "source")
    g.link(facesim, "annotated", annotated, "images")
    g.column(("Models", "models", [unet, clip, vae]))
    g.column(("Identities", "identities", [tuple(portraits), analyzer, encode]))
    g.column(("Identity guidance (optional, bypassed)", "optional", [guide_note, schedule, guidance]))
    g.column(("Prompt", "prompt", prompt_nodes))
    g.column(("Seed search", "sampling", [shift, latent, search, decode, search_report]))
    g.column(("Output", "output", [save, facesim, shown, annotated]))
    return g.to_json(uid)


# File names are what the frontend's template browser shows as each template's title (and, with '-' and '_' read
# as spaces, its description); each has a '<name>.jpg' thumbnail beside it (workflows/_measure.py).
TASK1, TASK2, SCORING = ("IdGlow group photo (Task 1).json", "IdGlow group as children (Task 2).json",
                         "IdGlow FaceSim score.json")
TRAINING_FREE = "IdGlow training-free identity (no adapter).json"


def build_all(object_info: dict) -> dict[str, dict]:
    """``{file name: UI workflow}`` for every shared workflow."""
    return {
        TASK1: _generation(object_info, "group", "1d61057a-0000-4000-8000-000000000001"),
        TASK2: _generation(object_info, "age", "1d61057a-0000-4000-8000-000000000002"),
        SCORING: _scoring(object_info, "1d61057a-0000-4000-8000-000000000003"),
        TRAINING_FREE: _training_free(object_info, "1d61057a-0000-4000-8000-000000000004"),
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

Shared workflows (drag a file onto the ComfyUI canvas, or open the pack's templates: Templates -> Extensions ->
ComfyUI-IdGlow): `workflows/IdGlow group photo (Task 1).json`, `workflows/IdGlow group as children (Task 2).json`,
`workflows/IdGlow FaceSim score.json`, `workflows/IdGlow training-free identity (no adapter).json`.
Qwen-Image-Edit-2511 needs ComfyUI 0.5 or newer (its reference method
`index_timestep_zero`, set by the Edit Model Reference Method nodes in the workflows; tested with 0.8.0).

Tests against a real ComfyUI (`tests/test_comfyui*.py`, skipped when `COMFYUI_DIR` is unset) need a ComfyUI
checkout and a Python with its requirements plus IdGlow's: `pip install -r $COMFYUI_DIR/requirements.txt requests
-r requirements.txt` (insightface with `--no-deps`), then `COMFYUI_DIR=/path/to/ComfyUI python -m pytest -q
tests/test_comfyui.py tests/test_comfyui_workflows.py`. On a CPU-only torch, PyPI's torchvision and torchaudio are
CUDA builds: ComfyUI needs `torchvision` importable (a CPU build, or the op-schema shim in the project notes) and
`transformers` breaks while a CUDA-only `torchaudio` is installed (uninstall it; only ComfyUI's audio nodes use it).
After changing a node's inputs, regenerate the workflows (laid out at the real frontend's node sizes, with their
thumbnails and screenshots) and this file: `COMFYUI_DIR=/path/to/ComfyUI python workflows/_measure.py` (needs
Debian's `chromium` and `pip install playwright`), or `python workflows/_build.py` to reuse the recorded sizes.
The browser tests (`tests/test_frontend.py`) check every workflow in the real frontend.
"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# Dropdowns whose values depend on the machine or the ComfyUI version: the docs describe them.
FILE_LISTS = {("IdGlowAdapterLoader", "adapter_name"): "a file in models/idglow",
              ("IdGlowAestheticScore", "model"): "a folder in models/aesthetic ('.' = the folder itself)",
              ("IdGlowVLMLoader", "model"): "a model folder in models/LLM or models/text_encoders",
              ("IdGlowVLMLoader", "lora"): "`none` or a LoRA folder in models/LLM or models/loras",
              # ComfyUI's own lists, which change with its version (NODES.md must not)
              ("IdGlowSeedSearch", "sampler_name"): "a sampler of this ComfyUI's KSampler; default `euler`",
              ("IdGlowSeedSearch", "scheduler"): "a scheduler of this ComfyUI's KSampler; default `simple`"}


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
