"""FaceSim (Eq. 2) and the ID loss (Eq. 3) against numbers worked out by hand."""
import math

import numpy as np
import pytest
import torch

from idglow_core.errors import InputError
from idglow_core.facesim import id_loss, match_identities


def unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# Three orthonormal "identities" and generated faces built from them with known cosines.
E = np.eye(3)


def test_square_assignment_follows_similarity_not_order():
    # gen 0 looks like ref 1 (cos 0.8), gen 1 like ref 0 (cos 0.6).
    ref = np.stack([E[0], E[1]])
    gen = np.stack([unit(0, 0.8, 0.6), unit(0.6, 0, 0.8)])
    r = match_identities(ref, gen)
    assert r.matrix.shape == (2, 2)
    np.testing.assert_allclose(r.matrix, [[0.0, 0.6], [0.8, 0.0]], atol=1e-12)
    assert r.assignment.tolist() == [1, 0]
    np.testing.assert_allclose(r.similarity, [0.6, 0.8])
    assert r.strict == pytest.approx((0.6 + 0.8) / 2)
    assert r.matched == pytest.approx(0.7)
    assert r.count_ok
    assert r.confusion == pytest.approx(0.0)  # off-assignment pairs are (0,0)=0 and (1,1)=0


def test_hungarian_beats_greedy():
    # Greedy (ref0 takes its best 0.9 first) would give 0.9 + 0.1 = 1.0; the optimum is 0.8 + 0.7 = 1.5.
    S = np.array([[0.9, 0.8], [0.7, 0.1]])
    # Realise S with unit vectors: use ref = identity rows in 2-D and gen columns = S columns (not unit), so
    # compare through a matrix that is already cosine: pass normalised ref and gen reconstructed from S.
    ref = np.eye(2)
    gen = S.T / np.linalg.norm(S.T, axis=1, keepdims=True)
    r = match_identities(ref, gen)
    # cosines are S normalised per generated face:
    n0, n1 = math.hypot(0.9, 0.7), math.hypot(0.8, 0.1)
    np.testing.assert_allclose(r.matrix, [[0.9 / n0, 0.8 / n1], [0.7 / n0, 0.1 / n1]], atol=1e-12)
    assert r.assignment.tolist() == [1, 0]  # 0.8/n1 + 0.7/n0 = 0.992 + 0.614 > 0.789 + 0.124
    assert r.strict == pytest.approx((0.8 / n1 + 0.7 / n0) / 2)


def test_fewer_faces_than_references_gives_minus_one_and_strict_over_k():
    ref = np.stack([E[0], E[1], E[2]])
    gen = np.stack([unit(0.6, 0.8, 0), unit(0, 0, 1)])  # cos(ref0)=0.6, cos(ref1)=0.8, cos(ref2, gen1)=1
    r = match_identities(ref, gen)
    assert r.assignment.tolist() == [-1, 0, 1]
    np.testing.assert_allclose(r.similarity, [0.0, 0.8, 1.0])
    assert r.strict == pytest.approx(1.8 / 3)
    assert r.matched == pytest.approx(0.9)
    assert not r.count_ok
    # matched refs {1, 2} x gen {0, 1}: off-assignment cosines are (1,1)=0 and (2,0)=0
    assert r.confusion == pytest.approx(0.0)


def test_more_faces_than_references_leaves_extras_unmatched():
    ref = np.stack([E[0]])
    gen = np.stack([unit(0, 1, 0), unit(1, 1, 0), unit(1, 0, 0)])
    r = match_identities(ref, gen)
    assert r.assignment.tolist() == [2]
    assert r.strict == pytest.approx(1.0)
    assert not r.count_ok
    assert math.isnan(r.confusion)  # one matched pair: no off-assignment pair among matched


def test_no_generated_face():
    r = match_identities(np.stack([E[0], E[1]]), np.zeros((0, 3)))
    assert r.assignment.tolist() == [-1, -1]
    assert r.strict == 0.0
    assert math.isnan(r.matched)
    assert r.to_dict()["facesim_matched"] is None


def test_confusion_is_mean_of_off_assignment_pairs():
    ref = np.stack([E[0], E[1]])
    gen = np.stack([unit(1, 0.5, 0), unit(0.25, 1, 0)])
    r = match_identities(ref, gen)
    assert r.assignment.tolist() == [0, 1]
    off = [0.25 / math.hypot(0.25, 1), 0.5 / math.hypot(1, 0.5)]
    assert r.confusion == pytest.approx(sum(off) / 2)


def test_bad_shapes_raise_typed_errors():
    with pytest.raises(InputError, match="same face backend"):
        match_identities(np.eye(2), np.ones((1, 3)))
    with pytest.raises(InputError, match="at least one reference"):
        match_identities(np.zeros((0, 3)), np.ones((1, 3)))
    with pytest.raises(InputError, match=r"\[count, dim\]"):
        match_identities(np.ones(3), np.ones((1, 3)))


def test_id_loss_matches_eq3_by_hand_and_is_differentiable():
    ref = torch.tensor(np.stack([E[0], E[1]]), dtype=torch.float64)
    gen = torch.tensor(np.stack([unit(0, 0.8, 0.6), unit(0.6, 0, 0.8)]), dtype=torch.float64, requires_grad=True)
    loss = id_loss(ref, gen)
    # sigma = [1, 0]: (1 - 0.6) + (1 - 0.8) over k = 2
    assert loss.item() == pytest.approx(((1 - 0.6) + (1 - 0.8)) / 2)
    loss.backward()
    assert gen.grad is not None and torch.isfinite(gen.grad).all()
    assert gen.grad.abs().sum() > 0


def test_id_loss_missing_face_counts_one():
    ref = torch.tensor(np.stack([E[0], E[1], E[2]]), dtype=torch.float32)
    gen = torch.tensor(np.stack([unit(0, 1, 0)]), dtype=torch.float32, requires_grad=True)
    loss = id_loss(ref, gen)
    # ref1 matched with cos 1 -> 0; two missing -> 1 each; mean over 3
    assert loss.item() == pytest.approx(2.0 / 3.0, abs=1e-6)
    assert id_loss(ref, torch.zeros(0, 3)).item() == pytest.approx(1.0)
    assert id_loss(ref, torch.zeros(0, 3), missing_value=0.5).item() == pytest.approx(0.5)


def test_id_loss_gradient_flows_only_through_matched_faces():
    ref = torch.tensor(np.stack([E[0]]), dtype=torch.float64)
    gen = torch.tensor(np.stack([unit(0.1, 1, 0), unit(1, 0.2, 0)]), dtype=torch.float64, requires_grad=True)
    id_loss(ref, gen).backward()
    assert gen.grad[0].abs().sum() == 0  # unmatched face gets no gradient
    assert gen.grad[1].abs().sum() > 0


def test_id_conf_against_hand_values():
    from idglow_core.facesim import id_conf
    S = np.array([[0.8, 0.6, 0.1],     # (0.8 - 0.6) / 0.8 = 0.25
                  [0.5, -0.3, 0.5],    # two equal best faces: (0.5 - 0.5) / 0.5 = 0
                  [0.9, -0.2, -0.4],   # rivals below 0 count as 0: (0.9 - 0) / 0.9 = 1
                  [-0.1, -0.2, -0.3]])  # nothing resembles this reference: undefined
    c = id_conf(S)
    np.testing.assert_allclose(c[:3], [0.25, 0.0, 1.0])
    assert math.isnan(c[3])
    np.testing.assert_allclose(id_conf(np.array([[0.7], [0.4]])), [1.0, 1.0])  # one face: no runner-up
    assert np.isnan(id_conf(np.zeros((2, 0)))).all()


def test_match_identities_reports_id_conf_mean():
    ref = np.stack([E[0], E[1]])
    gen = np.stack([unit(0.8, 0.6, 0), unit(0.6, 0, 0.8)])  # ref0 cos 0.8 / 0.6, ref1 cos 0.6 / 0
    r = match_identities(ref, gen)
    np.testing.assert_allclose(r.id_conf, [0.25, 1.0])
    assert r.id_conf_mean == pytest.approx(0.625)
    assert r.to_dict()["id_conf"] == pytest.approx([0.25, 1.0])
