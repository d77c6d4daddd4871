"""What a trained run exports loads in diffusers and in real ComfyUI with the trained output (issue 12, points 7
and 11): the LoRA keeps its ``lora_alpha / rank`` scale in both loaders' conventions, and a full fine-tune
becomes one safetensors file that ComfyUI's own Qwen-Image detection and loading code reads.

ComfyUI tests need ``COMFYUI_DIR`` (skipped with a printed reason when unset). UNETLoader builds the DiT at the
real widths (3072 / 3584) whatever the file holds, so the tiny files here go through the code it runs after
that: ComfyUI's prefix handling and ``model_detection`` on the file's keys, then
``supported_models.QwenImage(config).get_model`` + ``load_model_weights``, with the widths of the tiny config.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from idglow_core.testing import OneFaceAnalyzer, tiny_edit_pipeline
from idglow_core.training import load_config
from idglow_core.training.packing import edit_inputs, unpack_latents

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


def _inputs(seed: int = 5):
    """Two samples: target latent [2, 4, 1, 8, 12], one reference [2, 4, 1, 4, 8], prompt [2, 7, 16], t.

    Token grids have even sides: for an odd side ComfyUI 0.8 and diffusers centre the RoPE positions one
    token apart (ComfyUI -(n // 2) .. , diffusers -(n - n // 2) ..), so the two hosts differ there anyway."""
    gen = torch.Generator().manual_seed(seed)
    x, ref = torch.randn(2, 4, 1, 8, 12, generator=gen), torch.randn(2, 4, 1, 4, 8, generator=gen)
    return x, ref, torch.randn(2, 7, 16, generator=gen), torch.tensor([0.3, 0.8])


@torch.no_grad()
def _diffusers_out(transformer, x, ref, ctx, t) -> torch.Tensor:
    """The diffusers host's velocity for the target, ``[B, C, 1, h, w]``."""
    out = transformer(**edit_inputs(x, [ref], t), encoder_hidden_states=ctx,
                      encoder_hidden_states_mask=torch.ones(ctx.shape[:2]), return_dict=False)[0]
    h, w = x.shape[-2:]
    return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w)


def _lora_module(tmp_path, rank: int = 4, alpha: int = 8):
    """A train module with a LoRA of rank 4 and alpha 8 whose A and B are random (a fresh LoRA adds 0)."""
    from idglow_core.training.models import build_train_module

    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "run.train=lora", f"model.lora_rank={rank}",
                             f"model.lora_alpha={alpha}"])
    module = build_train_module(cfg, tiny_edit_pipeline(text_encoder=False), id_dim=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    module.detach_hooks()
    return module.eval()


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    from idglow_core.training.export import LORA_FILE, export_weights

    folder = tmp_path_factory.mktemp("lora_export")
    module = _lora_module(folder)
    export_weights(module, folder, "lora", {"trainer": "test"})
    return module, folder / LORA_FILE


def test_lora_file_holds_the_scale_in_lora_b(lora_export):
    module, path = lora_export
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["idglow_lora"])
    assert meta == {"rank": 4, "alpha": 8, "scale_in_lora_B": 2.0}
    stored = load_file(str(path))
    trained = dict(module.transformer.named_parameters())
    key = "transformer_blocks.0.attn.to_q.lora_B"
    assert torch.equal(stored[f"transformer.{key}.weight"], trained[f"{key}.default.weight"] * 2.0)
    key = "transformer_blocks.0.attn.to_q.lora_A"
    assert torch.equal(stored[f"transformer.{key}.weight"], trained[f"{key}.default.weight"])


def test_diffusers_load_lora_weights_reproduces_the_trained_output(lora_export):
    """alpha 8, rank 4: diffusers builds the LoRA with alpha = rank when the file names none; the folded scale
    makes its output the trained one (before the fix it was the base plus half the trained delta)."""
    module, path = lora_export
    x, ref, ctx, t = _inputs()
    trained = _diffusers_out(module.transformer, x, ref, ctx, t)
    pipe = tiny_edit_pipeline(text_encoder=False)
    base = _diffusers_out(pipe.transformer, x, ref, ctx, t)
    pipe.load_lora_weights(str(path.parent))
    loaded = _diffusers_out(pipe.transformer, x, ref, ctx, t)
    assert (trained - base).abs().max() > 1e-2  # the LoRA matters: the comparison is not vacuous
    assert torch.allclose(loaded, trained, atol=1e-5), (loaded - trained).abs().max()


def test_dpo_start_reads_the_exported_lora_back_to_the_trained_weights(lora_export, tmp_path):
    from idglow_core.training.dpo import _load_lora

    module, path = lora_export
    fresh = _lora_module(tmp_path)
    with torch.no_grad():
        for name, p in fresh.transformer.named_parameters():
            if "lora_" in name:
                p.zero_()
    _load_lora(fresh, path)
    want = {k: v for k, v in module.transformer.named_parameters() if "lora_" in k}
    got = dict(fresh.transformer.named_parameters())
    assert want and all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())


# ------------------------------------------------------------------------------------------- real ComfyUI
@pytest.fixture(scope="module")
def comfy_env():
    import comfy_helpers as ch

    return ch.boot_comfy()


def _comfy_patcher(sd: dict[str, torch.Tensor], diffusers_config: dict):
    """Load a DiT state dict with ComfyUI's own code as ``comfy.sd.load_diffusion_model_state_dict`` does
    (prefix handling, ``model_detection``), adding the widths UNETLoader would hard-code; float32 compute."""
    import comfy.model_detection as md
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    sd = dict(sd)
    prefix = md.unet_prefix_from_state_dict(sd)
    temp = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    sd = temp if temp else sd
    family = md.model_config_from_unet(sd, "")  # what UNETLoader detects from the file
    assert isinstance(family, comfy.supported_models.QwenImage), family
    detected = md.detect_unet_config(sd, "")
    c = diffusers_config
    widths = {"out_channels": c["out_channels"], "attention_head_dim": c["attention_head_dim"],
              "num_attention_heads": c["num_attention_heads"], "joint_attention_dim": c["joint_attention_dim"],
              "axes_dims_rope": tuple(c["axes_dims_rope"]), "patch_size": c["patch_size"]}
    config = comfy.supported_models.QwenImage({**detected, **widths})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    expected = {k: v.float() for k, v in sd.items()}
    model.load_model_weights(sd, "")
    state = model.diffusion_model.state_dict()
    assert set(state) == set(expected)  # no missing and no unexpected key
    assert all(torch.equal(state[k].float(), expected[k]) for k in expected)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), detected


@torch.no_grad()
def _comfy_out(patcher, x, ref, ctx, t) -> torch.Tensor:
    return patcher.model.diffusion_model(x, t, ctx, ref_latents=[ref])


def test_comfyui_lora_loader_reproduces_the_trained_output(comfy_env, lora_export):
    """LoraLoaderModelOnly's code path (comfy.sd.load_lora_for_models with strength 1) on the base DiT gives
    the trained LoRA's output; ComfyUI reads no alpha key as scale 1, which the folded scale accounts for."""
    import comfy.sd
    import comfy.utils

    module, path = lora_export
    base = tiny_edit_pipeline(text_encoder=False).transformer
    from idglow_core.training.comfy_export import ZERO_COND_MARKER

    sd = {**base.state_dict(), ZERO_COND_MARKER: torch.zeros(0)}  # a 2511 DiT as ComfyUI's files mark it
    patcher, detected = _comfy_patcher(sd, dict(base.config))
    x, ref, ctx, t = _inputs()
    plain = _comfy_out(patcher, x, ref, ctx, t)
    assert torch.allclose(plain, _diffusers_out(base, x, ref, ctx, t), atol=1e-5)  # same DiT in both hosts
    lora = comfy.utils.load_torch_file(str(path))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    assert len(patched.patches) == len(lora) // 2  # every A/B pair became a weight patch
    comfy_env["folder_paths"].add_model_folder_path("loras", str(path.parent))  # the node itself, by file name
    node_model = comfy_env["nodes"].NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(
        patcher, path.name, 1.0)[0]
    want = _diffusers_out(module.transformer, x, ref, ctx, t)
    assert (want - plain).abs().max() > 1e-2
    for model in (patched, node_model):
        model.patch_model()
        try:
            got = _comfy_out(model, x, ref, ctx, t)
        finally:
            model.unpatch_model()
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from idglow_core.training.sft import run_sft

    out = tmp_path_factory.mktemp("full_run")
    cfg = load_config(TINY, [f"run.output_dir={out / 'run'}", f"data.cache_dir={out / 'cache'}", "data.synthetic=2",
                             "run.train=full", "optim.max_steps=1", "loss.id_weight=0", "run.tensorboard=false",
                             "run.validate_every=0"])
    return run_sft(cfg, analyzer=OneFaceAnalyzer())


def test_full_finetune_exports_one_bf16_file_in_comfyui_layout(full_run):
    from idglow_core.training.comfy_export import COMFY_DIT_FILE

    final = full_run.final_dir
    assert COMFY_DIT_FILE in json.loads((final / "outputs.json").read_text())["files"]
    sd = load_file(str(final / COMFY_DIT_FILE))
    diffusers = {}
    for shard in (final / "transformer").glob("*.safetensors"):
        diffusers.update(load_file(str(shard)))
    assert set(sd) == set(diffusers) | {"__index_timestep_zero__"}  # zero_cond_t marker for 2511
    assert sd["__index_timestep_zero__"].numel() == 0
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert all(torch.equal(sd[k], diffusers[k].to(torch.bfloat16)) for k in diffusers)


def test_convert_command_writes_the_same_file(full_run, tmp_path):
    import subprocess
    import sys

    from idglow_core.training.comfy_export import COMFY_DIT_FILE

    final = full_run.final_dir
    out = tmp_path / "dit.safetensors"
    rc = subprocess.run([sys.executable, str(ROOT / "train" / "to_comfyui.py"), str(final / "transformer"),
                         "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    got, want = load_file(str(out)), load_file(str(final / COMFY_DIT_FILE))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    fp32 = tmp_path / "dit32.safetensors"
    from idglow_core.training.comfy_export import convert_transformer_folder
    convert_transformer_folder(final / "transformer", fp32, "fp32")
    assert load_file(str(fp32))["img_in.weight"].dtype == torch.float32
    bad = subprocess.run([sys.executable, str(ROOT / "train" / "to_comfyui.py"), str(tmp_path), "-o",
                          str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a diffusers transformer folder" in bad.stderr


def test_comfyui_loads_the_full_finetune_with_the_diffusers_output(comfy_env, full_run):
    """The exported bf16 file, read by ComfyUI's loading code, predicts what the diffusers host predicts with
    the same (bf16-rounded) weights, references included (2511's t = 0 modulation of reference tokens)."""
    import comfy.utils
    from diffusers import QwenImageTransformer2DModel

    from idglow_core.training.comfy_export import COMFY_DIT_FILE

    final = full_run.final_dir
    sd = comfy.utils.load_torch_file(str(final / COMFY_DIT_FILE))
    host = QwenImageTransformer2DModel.from_pretrained(str(final / "transformer")).eval()
    patcher, detected = _comfy_patcher(sd, dict(host.config))
    assert detected["default_ref_method"] == "index_timestep_zero" and detected["num_layers"] == 2
    with torch.no_grad():
        for p in host.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the file's precision
    x, ref, ctx, t = _inputs()
    want = _diffusers_out(host, x, ref, ctx, t)
    got = _comfy_out(patcher, x, ref, ctx, t)
    base = _diffusers_out(tiny_edit_pipeline(text_encoder=False).transformer, x, ref, ctx, t)
    assert (want - base).abs().max() > 1e-3  # the fine-tune changed the DiT
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_unetloader_loads_a_full_width_export_by_file_name(comfy_env, tmp_path):
    """UNETLoader itself (it builds the DiT at the real widths, 3072 / 3584): a 0-block 2511 DiT at those widths
    exported by save_comfyui_dit into models/diffusion_models is detected and loaded, and predicts what the
    diffusers host predicts with the same bf16-rounded weights."""
    from diffusers import QwenImageTransformer2DModel

    from idglow_core.training.comfy_export import save_comfyui_dit

    torch.manual_seed(0)
    host = QwenImageTransformer2DModel(num_layers=0, zero_cond_t=True).eval()  # the 2511 config, no blocks
    folder = tmp_path / "diffusion_models"
    save_comfyui_dit(host.state_dict(), dict(host.config), folder / "idglow_dit.safetensors")
    comfy_env["folder_paths"].add_model_folder_path("diffusion_models", str(folder))
    model = comfy_env["nodes"].NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet("idglow_dit.safetensors", "default")[0]
    dit = model.model.diffusion_model
    assert dit.default_ref_method == "index_timestep_zero" and len(dit.transformer_blocks) == 0
    with torch.no_grad():
        for p_ in host.parameters():
            p_.copy_(p_.to(torch.bfloat16).float())
    gen = torch.Generator().manual_seed(2)
    x, ref = torch.randn(1, 16, 1, 4, 4, generator=gen), torch.randn(1, 16, 1, 4, 4, generator=gen)
    ctx, t = torch.randn(1, 5, 3584, generator=gen), torch.tensor([0.6])
    want = _diffusers_out(host, x, ref, ctx, t)
    with torch.no_grad():
        got = dit(x.to(dit.dtype), t.to(dit.dtype), ctx.to(dit.dtype), ref_latents=[ref.to(dit.dtype)]).float()
    tol = 1e-4 if dit.dtype == torch.float32 else 5e-2
    assert torch.allclose(got, want, atol=tol), ((got - want).abs().max(), dit.dtype)
