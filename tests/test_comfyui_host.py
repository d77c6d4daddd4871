"""The IdGlow patch as ComfyUI hosts it (``COMFYUI_DIR``; skipped with a printed reason when unset): memory
management of the adapter, the sigma each CFG row sees, and equivalence with the diffusers host.
"""
from __future__ import annotations

import pytest
import torch

import comfy_helpers as ch


@pytest.fixture(scope="module")
def env():
    return ch.boot_comfy()


def _adapter(hidden: int, blocks: int, id_dim: int = 16, seed: int = 0):
    """A small adapter whose output projections are non-zero (a fresh one adds exactly 0)."""
    from idglow_core.adapter import AdapterConfig, IdGlowAdapter
    torch.manual_seed(seed)
    adapter = IdGlowAdapter(AdapterConfig(hidden_dim=hidden, num_blocks=blocks, inner_dim=32, head_dim=16,
                                          token_dim=32, tokens_per_id=2, max_ids=4, id_dim=id_dim))
    with torch.no_grad():
        for blk in adapter.blocks:
            blk.to_out.weight.normal_(0, 0.5)
    return adapter.eval()


# ------------------------------------------------------------------------------------------- memory management
def test_low_vram_load_moves_the_whole_adapter_to_the_load_device(env):
    """load_models_gpu gives each model a byte budget when VRAM is short (always with --lowvram / --novram).
    ComfyUI then moves only the layers that fit, and the adapter's plain torch layers cannot cast weights on
    the fly like comfy.ops layers: a split adapter makes block_residual mix devices. It must load whole.
    The 'meta' device stands in for the GPU (this runs on CPU only)."""
    import comfy.model_management as mm
    adapter = _adapter(hidden=64, blocks=2)               # throwaway: weights moved to 'meta' lose their values
    patcher = ch.pack_submodule("nodes.model_nodes").wrap_adapter(adapter)
    patcher.load_device = torch.device("meta")
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=patcher.model_size() // 3)  # what load_models_gpu passes when short
    assert {p.device.type for p in adapter.parameters()} == {"meta"}
    assert patcher.loaded_size() == patcher.model_size()  # ComfyUI's accounting knows it is all there


def test_freeing_memory_never_leaves_half_an_adapter_on_the_gpu(env):
    """free_memory asks loaded models to give back some bytes (partially_unload). For the adapter that must mean
    all or nothing, or the next sampling finds it split (and partially_load never fixes a split plain module)."""
    import comfy.model_management as mm
    adapter = _adapter(hidden=64, blocks=2)
    patcher = ch.pack_submodule("nodes.model_nodes").wrap_adapter(adapter)
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=0)             # full load
    assert patcher.loaded_size() == patcher.model_size()
    loaded.model_unload(memory_to_free=patcher.model_size() // 3)
    assert patcher.loaded_size() in (0, patcher.model_size())
    clone = patcher.clone()
    assert type(clone) is type(patcher)                   # clones keep the all-or-nothing behaviour


# ------------------------------------------------------------------------------------------- sigma per CFG row
class ScaleRecorder:
    """Per DiT call: ComfyUI's own per-row timestep and chunk order; per adapter call: the scale it was given."""

    def __init__(self, adapter):
        self.adapter, self.original = adapter, adapter.block_residual
        self.calls, self.row_t, self.chunks, self.seen_t = [], None, None, []
        adapter.block_residual = self

    def wrapper(self, executor, x, timestep, context, attention_mask, guidance, ref_latents, transformer_options,
                **kw):
        self.row_t, self.chunks = timestep.detach().clone(), list(transformer_options["cond_or_uncond"])
        self.seen_t.append(round(float(timestep[0]), 5))
        return executor(x, timestep, context, attention_mask, guidance, ref_latents, transformer_options, **kw)

    def __call__(self, block_index, img, tokens, mask, scale, token_weights=None):
        self.calls.append((self.row_t, self.chunks, scale.detach().clone(), img.shape[0]))
        return self.original(block_index, img, tokens, mask, scale, token_weights)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_each_cfg_row_gets_weight_times_omega_of_its_own_sigma(env, sampler):
    """Batch of 2 latents, CFG 2 (cond and uncond stacked in one DiT call), apply_to positive: row r gets
    weight * Omega(t_r) when it belongs to the positive chunk, else 0. t_r is the timestep ComfyUI hands the
    DiT for that row; heun also calls the model at sigmas outside the schedule, and those must gate too."""
    import comfy.patcher_extension
    from idglow_core.schedules import Schedule
    base = ch.build_tiny_qwen()
    adapter = _adapter(hidden=64, blocks=2)
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), backend="test")
    schedule = Schedule("gate", {"lo": 0.3, "hi": 0.6})
    model = model_nodes.apply_idglow(base, model_nodes.wrap_adapter(adapter), ids, schedule, 0.8, None, "positive")
    recorder = ScaleRecorder(adapter)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "idglow_test", recorder.wrapper)
    gen = torch.Generator().manual_seed(3)
    positive, negative = [[torch.randn(1, 7, 64, generator=gen), {}]], [[torch.zeros(1, 7, 64), {}]]
    latent = {"samples": torch.zeros(2, 16, 8, 8)}
    sampler_node = env["nodes"].NODE_CLASS_MAPPINGS["KSampler"]()
    sampler_node.sample(model, 7, 8, 2.0, sampler, "simple", positive, negative, latent)
    assert recorder.calls, "the gate [0.3, 0.6] should open at some step"
    for row_t, chunks, scale, batch in recorder.calls:
        assert batch == 2 * len(chunks) == row_t.numel() == scale.numel()
        positive_row = torch.tensor([c == 0 for c in chunks]).repeat_interleave(2)  # chunk-major rows
        want = 0.8 * schedule(row_t.float()) * positive_row
        assert torch.allclose(scale, want.to(scale.dtype), atol=1e-6), (row_t, chunks, scale)
    assert any(len(chunks) == 2 for _, chunks, _, _ in recorder.calls)  # cond and uncond were really stacked
    opened = {round(float(c[0][0]), 5) for c in recorder.calls}
    assert opened == {t for t in recorder.seen_t if 0.3 <= t <= 0.6}   # every call inside the gate, no other
    if sampler == "heun":  # heun's corrector calls the model at the next sigma: more calls than steps
        assert len(recorder.seen_t) > 8


# ------------------------------------------------------------------------------------------- two hosts, one result
def _pack(latent: torch.Tensor) -> torch.Tensor:
    """``[B, 16, 1, H, W]`` -> diffusers' packed ``[B, H/2 * W/2, 64]`` (the same 2x2 patch order as ComfyUI)."""
    B, C, _, H, W = latent.shape
    return latent[:, :, 0].view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)


@pytest.mark.parametrize("ref_method", ["index", "index_timestep_zero"])
def test_comfyui_patch_and_diffusers_hooks_give_the_same_model_output(env, ref_method):
    """One random tiny DiT loaded into both hosts (identical without the adapter), one adapter, the same two
    identities with per-identity weights, a reference latent appended after the target tokens, and two samples at
    different t (one inside the gate, one outside): the ComfyUI patch and the diffusers hooks agree.

    ``index_timestep_zero``: Qwen-Image-Edit-2511 as trained, its reference latents modulated at t = 0 (ComfyUI's
    Edit Model Reference Method node, from 0.5; diffusers ``zero_cond_t=True``)."""
    import inspect
    if ref_method == "index_timestep_zero" and "index_timestep_zero" not in inspect.getsource(
            type(ch.build_tiny_qwen(num_layers=0).get_model_object("diffusion_model"))):
        pytest.skip("this ComfyUI predates Qwen-Image-Edit-2511's reference method (index_timestep_zero)")
    from diffusers import QwenImageTransformer2DModel
    from idglow_core.schedules import Schedule
    torch.manual_seed(0)
    dif = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                      axes_dims_rope=(8, 12, 12),
                                      zero_cond_t=ref_method == "index_timestep_zero").eval()
    with torch.no_grad():
        for p in dif.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    base = ch.build_tiny_qwen()
    dit = base.get_model_object("diffusion_model")
    assert dit.load_state_dict(dif.state_dict()) is not None   # ComfyUI's keys are diffusers' names

    adapter = _adapter(hidden=64, blocks=2)
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), backend="test")
    schedule, weight, id_weights = Schedule("gate", {"lo": 0.3, "hi": 0.6}), 0.9, [1.0, 0.4]
    patched = model_nodes.apply_idglow(base, model_nodes.wrap_adapter(adapter), ids, schedule, weight, id_weights)

    gen = torch.Generator().manual_seed(5)
    x, ref = torch.randn(2, 16, 1, 6, 8, generator=gen), torch.randn(2, 16, 1, 4, 4, generator=gen)
    ctx, t = torch.randn(2, 7, 64, generator=gen), torch.tensor([0.45, 0.8])
    options = {**patched.model_options["transformer_options"], "sigmas": t, "cond_or_uncond": [0]}
    cond = adapter.condition(ids.embeddings[None], weight=weight, schedule=schedule,
                             id_weights=torch.tensor(id_weights))
    with torch.no_grad():
        plain = dit(x, t, ctx, ref_latents=[ref], ref_latents_method=ref_method)
        comfy_out = dit(x, t, ctx, ref_latents=[ref], ref_latents_method=ref_method, transformer_options=options)
        kwargs = dict(hidden_states=torch.cat([_pack(x), _pack(ref)], dim=1), encoder_hidden_states=ctx,
                      encoder_hidden_states_mask=torch.ones(2, 7), timestep=t,
                      img_shapes=[[(1, 3, 4), (1, 2, 2)]] * 2, return_dict=False)
        dif_plain = dif(**kwargs)[0][:, :12]
        with adapter.attach(dif):
            dif_out = dif(**kwargs, attention_kwargs={"idglow": cond})[0][:, :12]
    assert torch.allclose(_pack(plain), dif_plain, atol=1e-6)  # the two hosts run the same DiT
    if ref_method == "index_timestep_zero":                      # and the 2511 method is really in force
        with torch.no_grad():
            assert not torch.allclose(plain, dit(x, t, ctx, ref_latents=[ref], ref_latents_method="index"))
    delta = _pack(comfy_out) - _pack(plain)
    assert delta[0].abs().max() > 1e-3 and torch.equal(comfy_out[1], plain[1])  # t=0.8 is outside the gate
    assert torch.allclose(_pack(comfy_out), dif_out, atol=1e-5), (_pack(comfy_out) - dif_out).abs().max()


def test_positive_only_follows_the_positive_prompt_not_chunk_zero(env):
    """cond_or_uncond holds indices into the guider's list of conds, not labels: DualCFGGuider calls the model
    with [negative, middle, positive], so the positive prompt is chunk 2 there. apply_to='positive' must inject
    into that chunk only (chunk 0 is the negative prompt)."""
    import comfy.patcher_extension
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from idglow_core.schedules import Schedule
    base = ch.build_tiny_qwen()
    adapter = _adapter(hidden=64, blocks=2)
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), backend="test")
    model = model_nodes.apply_idglow(base, model_nodes.wrap_adapter(adapter), ids, Schedule("constant"), 0.8, None,
                                     "positive")
    recorder = ScaleRecorder(adapter)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "idglow_test", recorder.wrapper)
    gen = torch.Generator().manual_seed(4)
    conds = [[[torch.randn(1, 7, 64, generator=gen), {}]] for _ in range(3)]  # positive, middle, negative
    guider = Guider_DualCFG(model)
    guider.set_conds(*conds)
    guider.set_cfg(2.0, 2.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
    latent = torch.zeros(1, 16, 1, 8, 8)                    # Qwen-Image latents are 5-D
    guider.sample(torch.randn(latent.shape, generator=gen), latent, comfy.samplers.sampler_object("euler"), sigmas,
                  seed=1)
    assert recorder.calls
    for _, chunks, scale, _ in recorder.calls:
        assert sorted(chunks) == [0, 1, 2]                     # negative, middle, positive in one batch
        want = torch.tensor([0.8 if c == 2 else 0.0 for c in chunks])
        assert torch.allclose(scale, want), (chunks, scale)


# ------------------------------------------------------------------------------------------- node-level contracts
def test_sampling_loads_the_adapter_with_the_model_and_clones_share_it(env):
    """The adapter's ModelPatcher is loaded by ComfyUI next to the DiT (patch.models()), and downstream clones
    (LoRA, ModelSampling...) share the one patch object instead of deep-copying the adapter."""
    import comfy.model_management as mm
    from idglow_core.schedules import Schedule
    base = ch.build_tiny_qwen()
    adapter = _adapter(hidden=64, blocks=2)
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    patcher = model_nodes.wrap_adapter(adapter)
    ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), backend="test")
    model = model_nodes.apply_idglow(base, patcher, ids, Schedule("constant"), 1.0)
    shifted = env["nodes"].NODE_CLASS_MAPPINGS["ModelSamplingAuraFlow"]().patch_aura(model, 3.1)[0]
    patches = [m.model_options["transformer_options"]["patches"]["double_block"][0] for m in (model, shifted)]
    assert patches[0] is patches[1] and patches[1].adapter is adapter
    positive, negative = [[torch.randn(1, 7, 64), {}]], [[torch.zeros(1, 7, 64), {}]]
    env["nodes"].common_ksampler(shifted, 0, 1, 1.0, "euler", "simple", positive, negative,
                                 {"samples": torch.zeros(1, 16, 8, 8)})
    assert any(m is patcher for m in mm.loaded_models())


def test_apply_warns_when_the_schedule_differs_from_the_trained_injection(env, caplog):
    """IdGlow Apply with the adapter's own (trained) schedule is silent; another schedule logs a warning."""
    import logging

    from idglow_core.schedules import Schedule
    base = ch.build_tiny_qwen()
    adapter = _adapter(hidden=64, blocks=2)
    adapter.trained_injection = {"group": "anneal(tau=0.3)", "age": "gate(lo=0.3,hi=0.6)"}
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), backend="test")
    caplog.set_level(logging.WARNING, logger="idglow")
    apply = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowApply"]
    apply.execute(base, model_nodes.wrap_adapter(adapter), ids, 1.0, Schedule.parse("gate"))
    assert "trained with" not in caplog.text
    apply.execute(base, model_nodes.wrap_adapter(adapter), ids, 1.0, Schedule("constant"))
    assert "injecting with schedule" in caplog.text and "trained with" in caplog.text


def test_identities_of_another_backend_are_refused_with_the_fix(env):
    """An adapter trained on 512-d ArcFace (insightface) given 128-d dlib identities: a typed error that names the
    backends, from IdGlow Apply; and FaceSim refuses identities of another analyzer."""
    from idglow_core.errors import IncompatibleAdapterError, InputError
    from idglow_core.schedules import Schedule
    base = ch.build_tiny_qwen()
    model_nodes, ops = ch.pack_submodule("nodes.model_nodes"), ch.pack_submodule("nodes._ops")
    patcher = model_nodes.wrap_adapter(_adapter(hidden=64, blocks=2, id_dim=512))
    dlib_ids = ops.IdentitySet(torch.nn.functional.normalize(torch.randn(2, 128), dim=-1), backend="dlib")
    apply = env["nodes"].NODE_CLASS_MAPPINGS["IdGlowApply"]
    with pytest.raises(IncompatibleAdapterError, match=r"128 dimensions.*512-d.*insightface"):
        apply.execute(base, patcher, dlib_ids, 1.0, Schedule("constant"))

    class Analyzer512:
        name, embedding_dim = "insightface", 512

        def analyze(self, image):
            return []

    with pytest.raises(InputError, match="same face analyzer"):
        ops.score_images(Analyzer512(), dlib_ids.embeddings, [torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()])
