"""No silently inert adapter (issue 12, point 5).

- the diffusers floor is the first release with ``zero_cond_t`` and attention kwargs in checkpointed blocks,
  and ``attach`` refuses an older one;
- a forward given an ID condition that no block received (diffusers 0.36's checkpointed call, simulated)
  raises a typed error naming the diffusers version instead of training an adapter that adds nothing;
- the hooks find their arguments by the forward's signature, not by guessed positions (diffusers 0.37 has
  ``txt_seq_lens`` before ``attention_kwargs``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from idglow_core.adapter import MIN_DIFFUSERS, IdGlowAdapter
from idglow_core.errors import DependencyError, IncompatibleAdapterError
from idglow_core.testing import tiny_edit_pipeline
from idglow_core.training.packing import edit_inputs

ROOT = Path(__file__).resolve().parents[1]


def _trained(transformer) -> IdGlowAdapter:
    adapter = IdGlowAdapter.init_for(transformer, id_dim=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in adapter.blocks:
            blk.to_out.weight.copy_(0.3 * torch.randn(blk.to_out.weight.shape, generator=g))
    return adapter


def _call(t: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(1)
    z, refs = torch.randn(1, 4, 1, 8, 8, generator=g), [torch.randn(1, 4, 1, 8, 8, generator=g)]
    return dict(**edit_inputs(z, refs, torch.tensor([t])), encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), return_dict=False)


def test_requirements_floor_is_the_first_diffusers_with_both_features():
    import diffusers
    from packaging.version import Version

    floor = re.search(r"^diffusers>=([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert floor == MIN_DIFFUSERS == "0.37.0"
    assert Version(diffusers.__version__) >= Version(floor)
    assert tiny_edit_pipeline(text_encoder=False).transformer.zero_cond_t  # the 2511 path is what tests run


def test_attach_refuses_an_older_diffusers(monkeypatch):
    import diffusers

    transformer = tiny_edit_pipeline(text_encoder=False).transformer
    monkeypatch.setattr(diffusers, "__version__", "0.36.0")
    with pytest.raises(DependencyError, match=r"diffusers 0\.36\.0 .*diffusers>=0\.37\.0"):
        IdGlowAdapter.init_for(transformer, id_dim=8).attach(transformer)


def test_a_condition_no_block_received_raises_naming_the_version():
    """diffusers 0.36 called checkpointed blocks without the attention kwargs: the adapter's residual was never
    added and its gradient was exactly 0. That call is reproduced here (modulate_index kept for zero_cond_t)."""
    import diffusers

    transformer = tiny_edit_pipeline(text_encoder=False).transformer
    adapter = _trained(transformer)
    transformer.enable_gradient_checkpointing()
    transformer._gradient_checkpointing_func = lambda block, *args: checkpoint(block, *args[:5], None, *args[6:],
                                                                              use_reentrant=False)
    cond = adapter.condition(torch.nn.functional.normalize(torch.randn(1, 2, 8), dim=-1))
    with adapter.attach(transformer):
        with pytest.raises(IncompatibleAdapterError, match=rf"diffusers {re.escape(diffusers.__version__)}.*"
                                                           rf"gradient checkpointing on.*>= {MIN_DIFFUSERS}"):
            transformer(**_call(), attention_kwargs={"idglow": cond})
        out = transformer(**_call())[0]  # no condition given: nothing to check, the base runs
    assert out.shape[0] == 1


def test_checkpointed_blocks_receive_the_condition_and_train():
    transformer = tiny_edit_pipeline(text_encoder=False).transformer
    adapter = _trained(transformer)
    cond = lambda: adapter.condition(torch.nn.functional.normalize(torch.randn(1, 2, 8,  # noqa: E731
                                     generator=torch.Generator().manual_seed(2)), dim=-1))
    with adapter.attach(transformer):
        plain = transformer(**_call(), attention_kwargs={"idglow": cond()})[0]
        transformer.enable_gradient_checkpointing()
        ckpt = transformer(**_call(), attention_kwargs={"idglow": cond()})[0]
        base = transformer(**_call())[0]
        ckpt.square().mean().backward()
    assert torch.allclose(plain, ckpt, atol=1e-6) and (ckpt - base).abs().max() > 1e-3
    assert all(blk.to_out.weight.grad.abs().sum() > 0 for blk in adapter.blocks)


def test_hooks_find_arguments_by_signature_not_position():
    """A DiT whose forward has another parameter order (as diffusers 0.37: txt_seq_lens before
    attention_kwargs), called positionally: the condition is still found and applied."""
    from diffusers import QwenImageTransformer2DModel

    class Reordered(QwenImageTransformer2DModel):
        def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                    timestep=None, img_shapes=None, txt_seq_lens=None, guidance=None, attention_kwargs=None,
                    return_dict=False):
            return super().forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                                   img_shapes=img_shapes, attention_kwargs=attention_kwargs, return_dict=return_dict)

    tiny = tiny_edit_pipeline(text_encoder=False).transformer
    model = Reordered.from_config(tiny.config)
    model.load_state_dict(tiny.state_dict())
    adapter = _trained(model)
    c = _call()
    cond = adapter.condition(torch.nn.functional.normalize(torch.randn(1, 2, 8), dim=-1))
    positional = (c["hidden_states"], c["encoder_hidden_states"], c["encoder_hidden_states_mask"], c["timestep"],
                  c["img_shapes"], None, None)
    with torch.no_grad(), adapter.attach(model):
        by_position = model(*positional, {"idglow": cond})[0]
        by_name = model(**c, attention_kwargs={"idglow": cond})[0]
        base = model(*positional, None)[0]
    assert torch.equal(by_position, by_name) and (by_position - base).abs().max() > 1e-3
