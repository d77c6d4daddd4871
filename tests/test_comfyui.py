"""The pack inside a real ComfyUI (``COMFYUI_DIR``; skipped with a printed reason when unset).

Loads the repository the way ComfyUI loads a custom-node folder, checks the registered schemas, and samples a
tiny random Qwen-Image (built from ComfyUI's own classes) with ComfyUI's own KSampler, patched by IdGlow Apply.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import comfy_helpers as ch

NODE_IDS = ["IdGlowFaceAnalyzerLoader", "IdGlowMultiIDEncode", "IdGlowAdapterLoader", "IdGlowSchedule", "IdGlowApply",
            "IdGlowApplyAdvanced", "IdGlowStaticPrompt", "IdGlowFaceSim", "IdGlowAestheticScore"]


@pytest.fixture(scope="module")
def env():
    return ch.boot_comfy()


def test_pack_loads_and_registers_every_node(env):
    assert env["loaded"] is True, "ComfyUI's load_custom_node reported an import failure (see the log above)"
    assert set(NODE_IDS) <= set(env["new_nodes"])
    assert all(n.startswith("IdGlow") for n in env["new_nodes"])


def test_every_node_has_a_description_and_every_input_a_tooltip(env):
    for node_id in env["new_nodes"]:
        schema = env["nodes"].NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.description, node_id
        assert schema.category == "IdGlow", node_id
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{node_id}: inputs without tooltip {missing}"


def test_model_folders_are_registered_and_keep_user_paths(env):
    folder_paths = env["folder_paths"]
    for name in ("insightface", "idglow", "aesthetic"):
        assert any(p.endswith(name) for p in folder_paths.get_folder_paths(name)), name
    register = ch.pack_submodule("nodes._comfy").register_model_folders
    folder_paths.add_model_folder_path("idglow", "/tmp/user_idglow_models")
    register()  # registering again (e.g. a reload) keeps the user's path and adds no duplicate
    paths = folder_paths.get_folder_paths("idglow")
    assert "/tmp/user_idglow_models" in paths and len(paths) == len(set(paths))


def test_combo_values_are_checked_by_the_nodes(env):
    schedule = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowSchedule"]
    from idglow_core.errors import InputError
    with pytest.raises(InputError, match="not one of"):
        schedule.execute("cosine", 0.3, 0.3, 0.6, 1.0, 0.1, "")
    sched, plot = schedule.execute("gate", 0.3, 0.3, 0.6, 1.0, 0.1, "")
    assert sched(0.45) == 1.0 and plot.shape == (1, 240, 480, 3)
    prompt = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowStaticPrompt"].execute("age", 3)[0]
    assert "Picture 3" in prompt and "children" in prompt


# ------------------------------------------------------------------------------------------- tiny Qwen-Image
def _fresh_adapter(dit, id_dim: int = 16):
    """A new adapter sized for ``dit`` whose output projections are made non-zero (a fresh one adds exactly 0)."""
    from idglow_core.adapter import AdapterConfig, IdGlowAdapter
    torch.manual_seed(0)
    adapter = IdGlowAdapter(AdapterConfig(hidden_dim=dit.inner_dim, num_blocks=len(dit.transformer_blocks),
                                          inner_dim=32, head_dim=16, token_dim=32, tokens_per_id=2, max_ids=4,
                                          id_dim=id_dim))
    with torch.no_grad():
        for blk in adapter.blocks:
            blk.to_out.weight.normal_(0, 0.5)
    return adapter.eval()


class Recorder:
    """Logs the sigma of every DiT call (a DIFFUSION_MODEL wrapper) and every injecting adapter call."""

    def __init__(self, adapter):
        self.adapter, self.original = adapter, adapter.block_residual
        self.sigma, self.steps, self.calls = None, [], []
        adapter.block_residual = self

    def wrapper(self, executor, x, timestep, *args, **kwargs):
        self.sigma = round(float(timestep.max()), 5)  # Qwen-Image: timestep == sigma == flow time t
        self.steps.append(self.sigma)
        return executor(x, timestep, *args, **kwargs)

    def __call__(self, block_index, img, tokens, mask, scale, token_weights=None):
        self.calls.append((self.sigma, block_index, scale.detach().clone(), img.shape[1]))
        return self.original(block_index, img, tokens, mask, scale, token_weights)

    def restore(self):
        self.adapter.block_residual = self.original


@pytest.fixture(scope="module")
def tiny(env):
    base = ch.build_tiny_qwen()
    dit = base.get_model_object("diffusion_model")
    adapter = _fresh_adapter(dit)
    ops = ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(embeddings=torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), backend="test")
    gen = torch.Generator().manual_seed(1)
    reference = {"reference_latents": [torch.randn(1, 16, 1, 8, 8, generator=gen)]}  # an edit model's input image
    positive = [[torch.randn(1, 7, 64, generator=gen), dict(reference)]]
    negative = [[torch.zeros(1, 7, 64), dict(reference)]]
    return {"base": base, "adapter": adapter, "patcher": ch.pack_submodule("nodes.model_nodes").wrap_adapter(adapter),
            "ids": ids, "positive": positive, "negative": negative}


def _sample(env, model, tiny, steps: int = 6, cfg: float = 2.0):
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    ksampler = env["nodes"].NODE_CLASS_MAPPINGS["KSampler"]()
    return ksampler.sample(model, 7, steps, cfg, "euler", "simple", tiny["positive"], tiny["negative"], latent)[0]["samples"]


def _apply(env, tiny, weight, schedule):
    apply = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowApply"]
    return apply.execute(tiny["base"], tiny["patcher"], tiny["ids"], weight, schedule)[0]


def test_apply_weight_zero_equals_input_and_weight_one_changes_it(env, tiny):
    from idglow_core.schedules import Schedule
    reference = _sample(env, tiny["base"], tiny)
    options_before = repr(tiny["base"].model_options)
    zero = _sample(env, _apply(env, tiny, 0.0, Schedule("constant")), tiny)
    assert torch.equal(zero, reference)                        # weight 0: the same latent, bit for bit
    changed = _sample(env, _apply(env, tiny, 1.0, Schedule("constant")), tiny)
    assert torch.isfinite(changed).all() and (changed - reference).abs().max() > 1e-3
    assert repr(tiny["base"].model_options) == options_before  # the input MODEL was not patched
    assert torch.equal(_sample(env, tiny["base"], tiny), reference)


def test_apply_advanced_per_identity_weights(env, tiny):
    from idglow_core.errors import InputError
    from idglow_core.schedules import Schedule
    advanced = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowApplyAdvanced"]
    reference = _sample(env, tiny["base"], tiny)
    run = (lambda w, to="both": _sample(env, advanced.execute(tiny["base"], tiny["patcher"], tiny["ids"], 1.0, w, to,
                                                              Schedule("constant"))[0], tiny))
    assert torch.equal(run("0, 0"), reference)       # both identities switched off: no residual at all
    first_only, both = run("1, 0"), run("")
    assert not torch.equal(first_only, reference) and not torch.equal(first_only, both)
    assert not torch.equal(run("", "positive"), both)  # CFG 2: injecting into one branch differs from both
    with pytest.raises(InputError, match="per-identity weights were given for 2"):
        run("1, 1, 1")
    with pytest.raises(InputError, match="not one of"):
        run("", "negative")


def test_patch_fires_only_at_the_steps_the_schedule_allows(env, tiny):
    import comfy.patcher_extension
    from idglow_core.schedules import Schedule
    model = _apply(env, tiny, 0.8, Schedule("gate", {"lo": 0.3, "hi": 0.6}))
    # a shift node placed AFTER IdGlow Apply changes the sigmas; the window is in t, so it must follow them
    shifted = env["nodes"].NODE_CLASS_MAPPINGS["ModelSamplingAuraFlow"]().patch_aura(model, 3.1)[0]
    recorder = Recorder(tiny["adapter"])
    seen = []
    try:
        for m in (model, shifted):
            m = m.clone()
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "idglow_test", recorder.wrapper)
            full = []
            m.set_model_double_block_patch(lambda kw: (full.append(kw["img"].shape[1]), kw)[1])
            recorder.steps, recorder.calls = [], []
            _sample(env, m, tiny, steps=8, cfg=1.0)
            inside = [s for s in recorder.steps if 0.3 <= s <= 0.6]
            outside = [s for s in recorder.steps if not 0.3 <= s <= 0.6]
            assert inside and outside, f"test set-up: steps {recorder.steps} should straddle [0.3, 0.6]"
            assert [c[0] for c in recorder.calls] == [s for s in inside for _ in range(2)]  # 2 blocks per step
            assert [c[1] for c in recorder.calls] == [0, 1] * len(inside)
            assert all(torch.allclose(c[2], torch.tensor([0.8])) for c in recorder.calls)  # weight * Omega(t) = 0.8
            assert {c[3] for c in recorder.calls} == {16} and set(full) == {32}  # 16 target + 16 reference tokens
            seen.append(recorder.steps)
    finally:
        recorder.restore()
    assert seen[0] != seen[1]  # the shift really moved the sigmas


def test_real_comfyui_main_loads_the_pack(env, tmp_path):
    """ComfyUI's main.py (its own loader, no repo on sys.path) imports the pack without an import failure.

    ``--base-directory`` gives the server its own custom_nodes/ (the pack linked in), so a copy of the pack that
    a developer also installed in ComfyUI's own custom_nodes/ is not loaded a second time."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / ch.PACK_DIR_NAME).symlink_to(ch.REPO, target_is_directory=True)
    comfy_dir = ch.comfy_dir_or_skip()
    proc = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--disable-api-nodes",
                           "--disable-auto-launch", "--base-directory", str(base),
                           "--database-url", "sqlite:///:memory:"],
                          cwd=comfy_dir, capture_output=True, text=True, timeout=240,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    times = log.split("Import times for custom nodes:")[-1]
    lines = [line for line in times.splitlines() if line.rstrip().endswith(ch.PACK_DIR_NAME)]
    assert len(lines) == 1 and "IMPORT FAILED" not in lines[0], log[-3000:]  # "0.1 seconds: <path>"
    pack = str(base / "custom_nodes" / ch.PACK_DIR_NAME)
    assert f"Cannot import {pack}" not in log and "Error while calling comfy_entrypoint" not in log, log[-3000:]


def test_face_nodes_run_as_a_comfyui_graph(env, data_dir, tmp_path):
    """LoadImage x3 -> analyzer (dlib) -> Multi-ID Encode -> FaceSim, executed by ComfyUI's PromptExecutor."""
    import shutil
    folder_paths = env["folder_paths"]
    for name in ("obama.jpg", "biden.jpg", "obama2.jpg"):
        shutil.copy(data_dir / name, tmp_path / name)
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "biden.jpg"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "obama2.jpg"}},
        "4": {"class_type": "IdGlowFaceAnalyzerLoader", "inputs": {"backend": "dlib", "provider": "cpu", "det_size": 640}},
        "5": {"class_type": "IdGlowMultiIDEncode", "inputs": {"analyzer": ["4", 0], "image1": ["1", 0],
                                                              "image2": ["2", 0], "face": "largest", "face_index": 0}},
        "6": {"class_type": "IdGlowFaceSim", "inputs": {"analyzer": ["4", 0], "images": ["3", 0], "ids": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
    }
    try:
        outputs, _ = ch.run_prompt(prompt)
    finally:
        folder_paths.set_input_directory(old_input)
    report = outputs["6"]["text"][0]
    assert "image 1: 1 face(s) for 2 reference(s) (count differs)" in report and "ref 1->face 1" in report
    assert "ref 2->none" in report
    assert len(outputs["7"]["images"]) == 2                      # two aligned face crops were previewed


def test_adapter_loader_reads_models_idglow(env, tiny, tmp_path):
    folder_paths = env["folder_paths"]
    tiny["adapter"].save(tmp_path / "tiny_adapter.safetensors")
    folder_paths.add_model_folder_path("idglow", str(tmp_path))
    loader = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowAdapterLoader"]
    patcher = loader.execute("tiny_adapter.safetensors")[0]
    loaded = patcher.model
    assert loaded.config == tiny["adapter"].config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny["adapter"].state_dict().values()))
    assert "tiny_adapter.safetensors" in loader.GET_SCHEMA().inputs[0].options  # the dropdown lists the file
    with pytest.raises(FileNotFoundError):
        loader.execute("missing.safetensors")


def test_aesthetic_node_scores_with_models_from_the_aesthetic_folder(env, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from idglow_core.aesthetic import AestheticMLP, AestheticScorer

    folder = tmp_path / "tiny_scorer"
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14, projection_dim=16))
    clip.save_pretrained(folder / "clip")
    head = AestheticMLP(16)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()},
              str(folder / "sac+logos+ava1-l14-linearMSE.safetensors"))
    env["folder_paths"].add_model_folder_path("aesthetic", str(tmp_path))
    node = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowAestheticScore"]
    assert "tiny_scorer" in node.GET_SCHEMA().inputs[1].options
    images = torch.rand(2, 40, 56, 3)
    out = node.execute(images, "tiny_scorer")
    want = AestheticScorer.from_dir(folder).score(ch.pack_submodule("nodes._convert").image_batch_to_numpy(images))
    assert out[0] == pytest.approx(float(want.mean()), abs=1e-5)
    assert out[1].startswith(f"image 1: {want[0]:.3f}; image 2: {want[1]:.3f}")
    from idglow_core.errors import InputError
    with pytest.raises(InputError, match="not one of"):
        node.execute(images, "no_such_folder")
