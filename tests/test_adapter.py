"""IdGlow adapter on a tiny diffusers Qwen-Image transformer: identity at init, target-only injection,
gradients (with/without checkpointing), variable k, file round trip, fit checks, detach, host-agnostic math."""
from __future__ import annotations

import os

import pytest
import torch

from idglow_core.adapter import AdapterConfig, IdGlowAdapter, count_parameters
from idglow_core.errors import IncompatibleAdapterError, InputError, ModelFormatError, ModelNotFoundError
from idglow_core.id_encoder import pad_identities
from idglow_core.schedules import Schedule
from idglow_core.testing import random_embeddings, tiny_transformer

H = W = 4  # 4x4 target tokens + 4x4 reference tokens


def _inputs(batch: int = 2, sigma: float = 0.5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 2 * H * W, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                encoder_hidden_states_mask=torch.ones(batch, 5), timestep=torch.full((batch,), sigma),
                img_shapes=[[(1, H, W), (1, H, W)]] * batch, return_dict=False)


def _ids(ks=(1, 3)):
    return pad_identities([random_embeddings(k, seed=i) for i, k in enumerate(ks)])


def _trained(adapter: IdGlowAdapter, seed: int = 0) -> IdGlowAdapter:
    """Stand-in for a trained adapter: non-zero output projections."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in adapter.blocks:
            blk.to_out.weight.copy_(torch.randn(blk.to_out.weight.shape, generator=g) * 0.1)
    return adapter


@pytest.fixture(scope="module")
def tr():
    return tiny_transformer().eval()


def test_fresh_adapter_and_weight_zero_are_bit_identical(tr):
    base = tr(**_inputs())[0]
    adapter = IdGlowAdapter.init_for(tr)
    emb, mask = _ids()
    with adapter.attach(tr):
        fresh = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask)})[0]
        _trained(adapter)
        zero = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask, weight=0.0)})[0]
        off = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask, schedule="gate")})[0]  # t=0.5
        on = tr(**_inputs(sigma=0.9), attention_kwargs={"idglow": adapter.condition(emb, mask, schedule="gate")})[0]
        active = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask)})[0]
    assert torch.equal(fresh, base) and torch.equal(zero, base)
    assert not torch.equal(off, base)  # gate is 1 at t = 0.5
    assert torch.equal(on, tr(**_inputs(sigma=0.9))[0])  # gate is 0 at t = 0.9
    assert (active - base).abs().max() > 1e-3


def test_only_target_tokens_change_and_block_residual_matches_hook(tr):
    adapter = _trained(IdGlowAdapter.init_for(tr))
    emb, mask = _ids()
    cond = adapter.condition(emb, mask, weight=0.7)
    seen = []
    record = (lambda m, a, o: seen.append(o[1]))
    rec = tr.transformer_blocks[0].register_forward_hook(record)
    tr(**_inputs())                                            # seen[0]: base block-0 image stream
    rec.remove()
    with adapter.attach(tr):  # hooks run in registration order: a recorder added now sees our output
        rec = tr.transformer_blocks[0].register_forward_hook(record)
        tr(**_inputs(), attention_kwargs={"idglow": cond})     # seen[1]
        rec.remove()
    base, patched = seen[0], seen[1]
    n = H * W
    assert torch.equal(patched[:, n:], base[:, n:])           # reference-image tokens untouched
    assert (patched[:, :n] - base[:, :n]).abs().min() > 0      # every target token changed
    # the host-agnostic call (what the ComfyUI double-block patch does) reproduces the hook exactly
    manual = base[:, :n] + adapter.block_residual(0, base[:, :n], cond.tokens, cond.mask, torch.tensor([0.7, 0.7]))
    assert torch.allclose(manual, patched[:, :n], atol=1e-6)


def test_residual_scales_linearly_and_per_identity_weights(tr):
    adapter = _trained(IdGlowAdapter.init_for(tr))
    h = torch.randn(1, H * W, 48)
    emb, mask = _ids(ks=(2,))
    t, m = adapter.encode(emb, mask)
    r1 = adapter.block_residual(1, h, t, m, 1.0)
    assert torch.allclose(adapter.block_residual(1, h, t, m, 0.25), 0.25 * r1, atol=1e-7)
    assert not adapter.block_residual(1, h, t, m, 0.0).any()
    both = adapter.condition(emb, mask, id_weights=[2.0, 2.0]).token_weights
    assert torch.allclose(adapter.block_residual(1, h, t, m, 1.0, both), 2 * r1, atol=1e-6)  # values x2
    first = adapter.condition(emb, mask, id_weights=[1.0, 0.0]).token_weights
    assert first[0].tolist() == [1.0] * 8 + [0.0] * 8
    r_first = adapter.block_residual(1, h, t, m, 1.0, first)
    assert (r_first - r1).abs().max() > 1e-4
    with pytest.raises(InputError, match="one weight per reference"):
        adapter.condition(emb, mask, id_weights=[1.0, 1.0, 1.0])


def test_variable_k_in_one_batch_matches_separate_calls(tr):
    adapter = _trained(IdGlowAdapter.init_for(tr))
    emb, mask = _ids(ks=(1, 3))
    with adapter.attach(tr):
        both = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask)})[0]
        x = _inputs()
        one = {**x, "hidden_states": x["hidden_states"][:1], "encoder_hidden_states": x["encoder_hidden_states"][:1],
               "encoder_hidden_states_mask": x["encoder_hidden_states_mask"][:1], "timestep": x["timestep"][:1],
               "img_shapes": x["img_shapes"][:1]}
        single = tr(**one, attention_kwargs={"idglow": adapter.condition(emb[:1, :1])})[0]
    assert torch.allclose(both[:1], single, atol=1e-5)  # padding identities are invisible
    with pytest.raises(InputError, match="at most 4"):
        adapter.condition(random_embeddings(5)[None])


def _loss_and_grads(tr, adapter, checkpointing: bool):
    tr.train()
    if checkpointing:
        tr.enable_gradient_checkpointing()
    try:
        emb, mask = _ids()
        with adapter.attach(tr):
            out = tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(emb, mask)})[0]
            # an interleaved forward with other identities (like a DPO reference pass) before backward
            with torch.no_grad():
                tr(**_inputs(seed=1), attention_kwargs={"idglow": adapter.condition(*_ids(ks=(2, 2)))})
            loss = out.pow(2).mean()
            loss.backward()
    finally:
        tr.disable_gradient_checkpointing()
        tr.eval()
    grads = {k: p.grad.clone() for k, p in adapter.named_parameters()}
    adapter.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_gradients_reach_every_adapter_param_only_and_agree_with_checkpointing(tr):
    tr.requires_grad_(False)
    adapter = IdGlowAdapter.init_for(tr, max_ids=3)
    loss0, g0 = _loss_and_grads(tr, adapter, False)
    assert all(g0[k].abs().sum() > 0 for k in g0 if k.endswith("to_out.weight"))  # zero init still trains
    _trained(adapter)
    loss1, g1 = _loss_and_grads(tr, adapter, False)
    loss2, g2 = _loss_and_grads(tr, adapter, True)
    assert [k for k, g in g1.items() if g.abs().sum() == 0] == []        # every adapter parameter
    assert all(p.grad is None for p in tr.parameters())                   # no base parameter
    assert torch.equal(loss1, loss2)
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) < 1e-6


def test_save_load_round_trip_and_metadata(tr, tmp_path):
    adapter = _trained(IdGlowAdapter.init_for(tr, default_schedule=Schedule("gate").to_str()))
    path = adapter.save(tmp_path / "a" / "idglow.safetensors", extra_metadata={"trained_on": "tiny"})
    assert os.listdir(path.parent) == ["idglow.safetensors"]  # no temp file left behind
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "idglow-adapter" and meta["format_version"] == "1" and meta["trained_on"] == "tiny"
    assert (meta["hidden_dim"], meta["num_blocks"], meta["inner_dim"], meta["tokens_per_id"], meta["max_ids"],
            meta["id_dim"], meta["base_family"]) == ("48", "2", "48", "8", "4", "512", "qwen-image")
    loaded = IdGlowAdapter.load(path, transformer=tr)
    assert loaded.config == adapter.config and loaded.default_schedule == Schedule("gate", {"lo": 0.3, "hi": 0.6})
    sd, sd2 = adapter.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_load_errors_name_the_mismatch(tr, tmp_path):
    path = IdGlowAdapter.init_for(tr).save(tmp_path / "a.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="dual-stream blocks: adapter 2, model 3"):
        IdGlowAdapter.load(path, transformer=tiny_transformer(num_layers=3))
    with pytest.raises(IncompatibleAdapterError, match="hidden width: adapter 48, model 32"):
        IdGlowAdapter.load(path, transformer=tiny_transformer(heads=2))
    with pytest.raises(IncompatibleAdapterError, match="not a Qwen-Image transformer"):
        IdGlowAdapter.init_for(torch.nn.Linear(2, 2))
    comfy_like = torch.nn.Module()  # ComfyUI's DiT: inner_dim + transformer_blocks, no diffusers config
    comfy_like.inner_dim, comfy_like.transformer_blocks = 48, torch.nn.ModuleList([torch.nn.Identity()] * 2)
    IdGlowAdapter.load(path, transformer=comfy_like)
    comfy_like.inner_dim = 3072
    with pytest.raises(IncompatibleAdapterError, match="hidden width: adapter 48, model 3072"):
        IdGlowAdapter.load(path).check_fits(comfy_like)
    with pytest.raises(ModelNotFoundError):
        IdGlowAdapter.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFormatError, match="Not an IdGlow adapter"):
        IdGlowAdapter.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError):
        IdGlowAdapter.load(tmp_path / "junk.safetensors")


def test_detach_leaves_the_model_identical(tr):
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    base = tr(**_inputs())[0]
    adapter = _trained(IdGlowAdapter.init_for(tr))
    handle = adapter.attach(tr)
    tr(**_inputs(), attention_kwargs={"idglow": adapter.condition(*_ids())})
    handle.detach()
    assert not tr._forward_pre_hooks and all(not b._forward_hooks and not b._forward_pre_hooks
                                             for b in tr.transformer_blocks)
    assert torch.equal(tr(**_inputs())[0], base)
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


def test_a_second_adapter_cannot_hijack_the_hooks_of_the_first(tr):
    """Two attached adapters: the first one's hooks would consume the second one's condition and apply it with
    the wrong cross-attention weights, silently. Attaching refuses until the first one is detached."""
    first, second = _trained(IdGlowAdapter.init_for(tr), seed=1), _trained(IdGlowAdapter.init_for(tr), seed=2)
    cond = second.condition(*_ids())
    with second.attach(tr):
        want = tr(**_inputs(), attention_kwargs={"idglow": cond})[0]
    handle = first.attach(tr)
    try:
        with pytest.raises(InputError, match="already has an IdGlow adapter attached"):
            second.attach(tr)
        with pytest.raises(InputError, match="already has an IdGlow adapter attached"):
            first.attach(tr)
    finally:
        handle.detach()
    with second.attach(tr):
        assert torch.equal(tr(**_inputs(), attention_kwargs={"idglow": cond})[0], want)


def test_parameter_count_formula_and_budget():
    cfg = AdapterConfig(hidden_dim=48, num_blocks=2, inner_dim=32, head_dim=16, token_dim=24, tokens_per_id=3,
                        max_ids=2, id_dim=20)
    assert count_parameters(cfg) == sum(p.numel() for p in IdGlowAdapter(cfg).parameters())
    real = count_parameters(AdapterConfig(hidden_dim=3072, num_blocks=60))  # Qwen-Image-Edit-2511 defaults
    assert real < 0.03 * 20.43e9
    with pytest.raises(InputError):
        AdapterConfig(hidden_dim=48, num_blocks=2, inner_dim=40, head_dim=16)


def test_block_residual_on_another_device_than_the_activations_raises():
    adapter = IdGlowAdapter(AdapterConfig(hidden_dim=32, num_blocks=1, inner_dim=16, head_dim=8, token_dim=16,
                                          tokens_per_id=2, id_dim=8))
    tokens, mask = adapter.encode(torch.randn(1, 1, 8))
    with pytest.raises(InputError, match="Move the adapter"):
        adapter.block_residual(0, torch.randn(1, 4, 32, device="meta"), tokens, mask, 1.0)


def _resave(src, dst, edit):
    """Copy an adapter file with ``edit(tensors)`` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_non_finite_identity_inputs_are_refused(tr):
    adapter = _trained(IdGlowAdapter.init_for(tr))
    emb = random_embeddings(2)[None]
    adapter.condition(emb)
    bad = emb.clone()
    bad[0, 1, 7] = float("nan")  # before the check: identity 2's tokens are NaN, and attention spreads it to all
    with torch.no_grad():
        tokens, mask = adapter.encode(bad)
        res = adapter.block_residual(0, torch.randn(1, 6, 48), tokens, mask, 1.0)
    assert torch.isnan(res).all()
    with pytest.raises(InputError, match=r"Face embeddings contain non-finite values .* at \[\[0, 1, 7\]\]"):
        adapter.condition(bad)
    with pytest.raises(InputError, match="identity weight"):
        adapter.condition(emb, weight=float("nan"))
    with pytest.raises(InputError, match="per-identity weights"):
        adapter.condition(emb, id_weights=torch.tensor([1.0, float("inf")]))


def test_adapter_files_with_nan_or_wrongly_shaped_tensors_are_refused(tr, tmp_path):
    path = _trained(IdGlowAdapter.init_for(tr)).save(tmp_path / "a.safetensors")

    def poison(t):
        t["blocks.1.to_out.weight"][0, 0] = float("nan")
    with pytest.raises(ModelFormatError, match=r"NaN or inf weights in 1 tensor\(s\) \(blocks.1.to_out.weight\)"):
        IdGlowAdapter.load(_resave(path, tmp_path / "nan.safetensors", poison))

    def reshape(t):
        t["encoder.slot"] = torch.zeros(3, t["encoder.slot"].shape[1])
    with pytest.raises(ModelFormatError, match=r"encoder.slot: \(3, 48\) \(expected \(4, 48\)\)"):
        IdGlowAdapter.load(_resave(path, tmp_path / "shape.safetensors", reshape))
    with pytest.raises(ModelNotFoundError, match="is a folder, not a file"):
        IdGlowAdapter.load(tmp_path)
