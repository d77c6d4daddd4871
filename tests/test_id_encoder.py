"""Multi-ID encoder: shapes, padding + mask, slot embeddings, limits, embedding-dimension errors."""
from __future__ import annotations

import pytest
import torch

from idglow_core.errors import IncompatibleAdapterError, InputError
from idglow_core.id_encoder import MultiIdEncoder, expand_id_weights, pad_identities
from idglow_core.testing import random_embeddings


@pytest.fixture()
def enc() -> MultiIdEncoder:
    torch.manual_seed(0)
    return MultiIdEncoder(id_dim=32, token_dim=16, tokens_per_id=4, max_ids=3)


def test_pad_identities_variable_k():
    e1, e3 = random_embeddings(1, 32), random_embeddings(3, 32, seed=1)
    emb, mask = pad_identities([e1, e3])
    assert emb.shape == (2, 3, 32)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(emb[0, 0], e1[0]) and torch.equal(emb[1], e3) and not emb[0, 1:].any()


def test_tokens_and_mask_for_one_and_three_identities(enc):
    emb, mask = pad_identities([random_embeddings(1, 32), random_embeddings(3, 32, seed=1)])
    tokens, tmask = enc(emb, mask)
    assert tokens.shape == (2, 12, 16) and tmask.shape == (2, 12) and tmask.dtype == torch.bool
    assert tmask[0].tolist() == [True] * 4 + [False] * 8 and tmask[1].all()
    assert not tokens[0, 4:].any()              # padding tokens are exactly zero
    # padding does not change the real tokens: sample 0 alone gives the same first 4 tokens
    alone, _ = enc(emb[:1, :1])
    assert torch.allclose(alone[0], tokens[0, :4], atol=1e-6)


def test_slot_embedding_tells_identities_apart(enc):
    e = random_embeddings(1, 32)
    tokens, _ = enc(torch.cat([e, e])[None])    # the same face in slots 0 and 1
    diff = tokens[0, 4:] - tokens[0, :4]
    assert torch.allclose(diff, (enc.slot[1] - enc.slot[0]).expand(4, -1), atol=1e-6)
    assert diff.abs().max() > 0


def test_more_identities_than_max_ids_raises(enc):
    with pytest.raises(InputError, match="at most 3"):
        enc(random_embeddings(4, 32)[None])
    with pytest.raises(InputError, match="at most 3"):
        pad_identities([random_embeddings(4, 32)], max_ids=3)


def test_wrong_embedding_dim_names_the_backend():
    enc = MultiIdEncoder(id_dim=512, token_dim=8, tokens_per_id=2, max_ids=2)
    with pytest.raises(IncompatibleAdapterError, match="dlib backend gives 128-d"):
        enc(random_embeddings(1, 128)[None])


def test_bad_inputs_raise():
    with pytest.raises(InputError):
        pad_identities([])
    with pytest.raises(InputError):
        pad_identities([torch.zeros(0, 8)])
    with pytest.raises(InputError):
        pad_identities([torch.zeros(1, 8), torch.zeros(1, 9)])


def test_expand_id_weights():
    w = torch.tensor([[1.0, 0.5]])
    assert expand_id_weights(w, 3).tolist() == [[1.0, 1.0, 1.0, 0.5, 0.5, 0.5]]


def test_encoder_is_trainable(enc):
    emb, mask = pad_identities([random_embeddings(3, 32)])
    tokens, _ = enc(emb, mask)
    tokens.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_check_finite_names_the_bad_entries():
    from idglow_core.id_encoder import check_finite

    check_finite(torch.ones(2, 3), "Face embeddings", "fix")
    check_finite(1.0, "weight", "fix")
    e = torch.ones(2, 3)
    e[1, 2] = float("nan")
    with pytest.raises(InputError, match=r"Face embeddings contain non-finite values \(NaN or inf\) at \[\[1, 2\]\]. fix"):
        check_finite(e, "Face embeddings", "fix")
    with pytest.raises(InputError, match=r"at \[\[1\]\]"):
        check_finite([1.0, float("inf")], "id_weights", "fix")
