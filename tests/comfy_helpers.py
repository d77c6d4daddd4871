"""Test helpers: import the node pack's ComfyUI-free modules, and boot a real ComfyUI in-process.

Real ComfyUI is not on any package registry: tests that need it read ``COMFYUI_DIR`` (a ComfyUI checkout whose
requirements are installed in the running Python) and are skipped with a printed reason when it is unset.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-IdGlow"
_ALIAS = "idglow_pack_nodes"  # never "nodes": that name belongs to ComfyUI's own nodes.py
_state: dict = {}


def pack_module(name: str) -> types.ModuleType:
    """Import ``nodes/<name>.py`` without running ``nodes/__init__.py`` (which needs ComfyUI)."""
    if _ALIAS not in sys.modules:
        pkg = types.ModuleType(_ALIAS)
        pkg.__path__ = [str(REPO / "nodes")]
        sys.modules[_ALIAS] = pkg
    return importlib.import_module(f"{_ALIAS}.{name}")


def comfy_dir_or_skip() -> Path:
    """The ComfyUI checkout from ``COMFYUI_DIR``, or skip the calling test with the reason printed."""
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        reason = "COMFYUI_DIR is not set: tests against real ComfyUI need a ComfyUI checkout (see NODES.md)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if not (Path(path) / "main.py").is_file() or not (Path(path) / "comfy").is_dir():
        pytest.fail(f"COMFYUI_DIR={path} is not a ComfyUI checkout (no main.py / comfy/). Point it at one.")
    return Path(path)


class StubServer:
    """The part of ComfyUI's PromptServer that execution and progress reporting use."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def __init__(self):
        from aiohttp import web
        self.messages: list = []
        self.routes = web.RouteTableDef()

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", text))


def boot_comfy() -> dict:
    """Import ComfyUI (CPU), register its built-in nodes, then load this repository as a custom-node pack the
    way ComfyUI does (``nodes.load_custom_node`` on ``<tmp>/custom_nodes/ComfyUI-IdGlow`` -> the repo).

    Returns ``{"nodes", "execution", "folder_paths", "loaded", "pack", "custom_nodes"}``; runs once per process.
    """
    if _state:
        return _state
    comfy_dir = comfy_dir_or_skip()
    other = sys.modules.get("nodes")
    if other is not None and not hasattr(other, "load_custom_node"):
        pytest.fail(f"A module named 'nodes' ({getattr(other, '__file__', other)}) was imported before ComfyUI. "
                    f"Import the pack's modules with comfy_helpers.pack_module(), never as 'nodes.*'.")
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args
    args.cpu = True                     # before comfy.model_management is imported: it picks the device then
    args.disable_api_nodes = True
    import utils.extra_config  # noqa: F401  must come before `import nodes` (nodes.py reorders sys.path)
    import execution
    import folder_paths
    import nodes
    import server

    server.PromptServer.instance = StubServer()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    custom = Path(tempfile.mkdtemp(prefix="idglow_custom_nodes_"))
    (custom / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    # Only this checkout: a copy of the pack that is also installed in ComfyUI's own custom_nodes/ is not seen.
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    before = set(nodes.NODE_CLASS_MAPPINGS)
    loaded = asyncio.run(nodes.load_custom_node(str(custom / PACK_DIR_NAME), ignore=before))
    pack_name = str(custom / PACK_DIR_NAME).replace(".", "_x_")
    _state.update(nodes=nodes, execution=execution, folder_paths=folder_paths, loaded=loaded,
                  pack=sys.modules.get(pack_name), pack_name=pack_name, custom_nodes=custom,
                  new_nodes=sorted(set(nodes.NODE_CLASS_MAPPINGS) - before))
    return _state


def pack_submodule(name: str) -> types.ModuleType:
    """A module of the pack as ComfyUI loaded it (e.g. 'nodes._ops'), so classes match the nodes' own."""
    return sys.modules[f"{boot_comfy()['pack_name']}.{name}"]


def object_info() -> dict:
    """What GET /object_info returns, built in-process (V3 nodes via GET_NODE_INFO_V1, V1 via INPUT_TYPES)."""
    nodes = boot_comfy()["nodes"]
    from comfy_api.internal import _ComfyNodeInternal
    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if issubclass(cls, _ComfyNodeInternal):
            info[name] = cls.GET_NODE_INFO_V1()
        else:
            spec = cls.INPUT_TYPES()
            info[name] = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()},
                          "output": list(cls.RETURN_TYPES),
                          "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}
    return info


def build_tiny_qwen(num_layers: int = 2, heads: int = 2, head_dim: int = 32, joint_dim: int = 64, seed: int = 0):
    """A tiny random Qwen-Image DiT built from ComfyUI's own classes, in a ModelPatcher (CPU, float32)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    quarter = head_dim // 4 // 2 * 2
    rope = (head_dim - 2 * ((head_dim - quarter) // 4 * 2), (head_dim - quarter) // 4 * 2, (head_dim - quarter) // 4 * 2)
    config = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": num_layers,
              "attention_head_dim": head_dim, "num_attention_heads": heads, "joint_attention_dim": joint_dim,
              "axes_dims_rope": rope}
    family = comfy.supported_models.QwenImage(config)
    family.set_inference_dtype(torch.float32, None)
    model = family.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy.ops layers are created uninitialised
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def workflow_builder() -> types.ModuleType:
    """``workflows/_build.py`` as a module (the folder is data, not a package)."""
    if "idglow_workflow_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("idglow_workflow_build", REPO / "workflows" / "_build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["idglow_workflow_build"]


VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def ui_to_api(workflow: dict, info: dict, older_nodes_ok: bool = False) -> tuple[dict, list[str]]:
    """Convert a UI workflow to the API prompt the editor would queue (its ``graphToPrompt``, common cases).

    Virtual nodes and muted (mode 2) nodes are dropped; bypassed (mode 4) nodes pass their same-typed input on;
    widget values are mapped by the schema's widget order; links win over widget values. Returns the prompt and
    a list of problems (unknown node types, widget-count mismatches). ``older_nodes_ok``: a node saved with fewer
    widget values than its schema has (saved before a widget was added) gets the schema's defaults for the missing
    trailing ones, as the editor does, instead of a problem (for files saved by other ComfyUI versions).
    """
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}  # [id, from node, from slot, to node, to slot, type]
    problems, prompt = [], {}

    def source(link_id):
        _, origin, slot, _, _, kind = links[link_id]
        node = by_id[origin]
        if node.get("mode") == 4 or node["type"] == "Reroute":
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp["type"] == kind):
                    return source(inp["link"])
            return None
        return None if node.get("mode") == 2 else [str(origin), slot]

    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        spec = info.get(node["type"])
        if spec is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        slots = workflow_builder().widget_slots(spec)
        values = list(node.get("widgets_values", []))
        if older_nodes_ok and len(values) < len(slots):
            values += [workflow_builder().default_value(spec) for _, spec in slots[len(values):]]
        if len(values) != len(slots):
            problems.append(f"node {node['id']} {node['type']}: {len(values)} widget values, schema has {len(slots)}")
        inputs = {name: ({"__value__": v} if isinstance(v, list) else v)
                  for (name, _), v in zip(slots, values) if name is not None}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is None:
                    inputs.pop(inp["name"], None)
                else:
                    inputs[inp["name"]] = src
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    for entry in prompt.values():  # links to dropped nodes vanish, as in the editor
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt, problems


def validate(prompt: dict) -> tuple[bool, dict]:
    """ComfyUI's own ``execution.validate_prompt``; returns (ok, {node id: [(error type, input name)]})."""
    execution = boot_comfy()["execution"]
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("idglow-test", prompt, None))
    return ok, {nid: [(e["type"], e.get("extra_info", {}).get("input_name")) for e in v["errors"]]
                for nid, v in node_errors.items()}


def new_executor(server: StubServer):
    """A ``PromptExecutor`` with the classic cache, built the way this ComfyUI's ``main.py`` builds one (0.8.0 reads
    ``cache_args["ram"]`` after every node and needs the dict; 0.3.64 has no such argument)."""
    import inspect
    execution = boot_comfy()["execution"]
    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0}
    return execution.PromptExecutor(server, **kwargs)


def run_prompt(prompt: dict) -> tuple[dict, list]:
    """Validate and execute an API prompt with ComfyUI's PromptExecutor; returns (outputs' ui, server messages)."""
    execution = boot_comfy()["execution"]
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("idglow-run", prompt, None))
    assert ok, f"validation failed: {error} {node_errors}"
    stub = StubServer()
    executor = new_executor(stub)
    executor.execute(prompt, "idglow-run", extra_data={}, execute_outputs=outputs)
    failures = [m[1] for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success, failures[0]["exception_message"] if failures else executor.status_messages
    return executor.history_result["outputs"], stub.messages


def build_tiny_vae(dim: int = 8, seed: int = 0):
    """A small random Wan 2.1 VAE (the Qwen-Image VAE family) as a ``comfy.sd.VAE``: ComfyUI reads the width from
    ``decoder.head.0.gamma``, so ``dim`` 8 instead of 96 gives ~0.9 M parameters (x8 spatial, 16 channels)."""
    import torch
    import comfy.ldm.wan.vae
    import comfy.sd

    net = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in net.state_dict().items():  # comfy.ops layers are created uninitialised
        if name.endswith("gamma"):
            sd[name] = torch.ones(p.shape)
        elif name.endswith("bias"):
            sd[name] = torch.zeros(p.shape)
        else:
            sd[name] = torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5
    return comfy.sd.VAE(sd=sd)
