"""Hungarian best-of-N: the ranking rule on hand-made scores, and on composites of real photos (dlib)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idglow_core.bestof import CandidateScore, rank_candidates, ranking_report, score_candidates
from idglow_core.errors import InputError
from idglow_core.facesim import match_identities


def _unit(*rows):
    a = np.asarray(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _cand(index, ref, gen, aesthetic=None):
    return CandidateScore(index, len(gen), match_identities(ref, np.asarray(gen).reshape(len(gen), -1)), aesthetic)


REF = _unit([1, 0, 0], [0, 1, 0])


def test_count_ok_beats_a_higher_strict_score_then_strict_then_id_conf_then_index():
    right = _cand(0, REF, _unit([1, 0.3, 0], [0, 1, 0.3]))          # both people, slightly off
    extra = _cand(1, REF, _unit([1, 0, 0], [0, 1, 0], [0, 0, 1]))   # perfect match but a third face
    missing = _cand(2, REF, _unit([1, 0, 0]))                        # one person missing
    same = _cand(3, REF, _unit([1, 0.3, 0], [0, 1, 0.3]))           # a tie with candidate 0
    order = [s.index for s in rank_candidates([missing, extra, same, right])]
    assert extra.strict > right.strict and not extra.count_ok
    assert order == [0, 3, 1, 2]                                     # count_ok first; tie -> earlier index
    # ID-Conf decides between equal strict scores: a blended face (both refs alike) loses
    clear = _cand(0, REF, _unit([1, 0, 0], [0, 1, 0]))
    blended = _cand(1, REF, _unit([1, 0, 0], [0, 1, 0]))
    object.__setattr__(blended.facesim, "id_conf_mean", 0.2)
    assert [s.index for s in rank_candidates([blended, clear])] == [0, 1]


def test_id_conf_against_hand_values():
    # faces (1, 0) and (0.6, 0.9)/|.| = (0.5547, 0.8321). Ref 1 sees cosines 1 and 0.5547 -> (1 - 0.5547) / 1 =
    # 0.4453; ref 2 sees 0 and 0.8321 -> (0.8321 - 0) / 0.8321 = 1. Mean 0.7227.
    gen = np.array([[1.0, 0.0], [0.6, 0.9]])
    s = CandidateScore(0, 2, match_identities(np.eye(2), gen / np.linalg.norm(gen, axis=1, keepdims=True)))
    assert s.facesim.id_conf == pytest.approx([1 - 0.6 / np.hypot(0.6, 0.9), 1.0], abs=1e-9)
    assert s.facesim.id_conf[0] == pytest.approx(0.4453, abs=1e-4)
    assert s.id_conf == pytest.approx(0.7227, abs=1e-4)
    nobody = CandidateScore(1, 1, match_identities(np.eye(2), np.array([[-1.0, -1.0]])))
    assert nobody.id_conf == 0.0                      # undefined ID-Conf ranks as 0


def test_aesthetic_term_with_a_weight():
    a = _cand(0, REF, _unit([1, 0.2, 0], [0, 1, 0.2]), aesthetic=3.0)
    b = _cand(1, REF, _unit([1, 0.25, 0], [0, 1, 0.25]), aesthetic=8.0)
    assert a.strict > b.strict
    assert [s.index for s in rank_candidates([a, b])] == [0, 1]             # weight 0: identity only
    gap = a.strict - b.strict
    assert [s.index for s in rank_candidates([a, b], aesthetic_weight=2 * gap / 5)] == [1, 0]
    with pytest.raises(InputError, match="no aesthetic score"):
        rank_candidates([a, _cand(2, REF, _unit([1, 0, 0]))], aesthetic_weight=0.1)
    with pytest.raises(InputError, match=">= 0"):
        rank_candidates([a], aesthetic_weight=-1)


def _fit(x, h=300):
    im = Image.fromarray(x)
    return np.asarray(im.resize((round(im.width * h / im.height), h)))


def _side_by_side(*images):
    return np.concatenate([_fit(x) for x in images], axis=1)


def test_right_people_rank_first_on_real_photos(data_dir):
    """References Obama and Biden (dlib). Composites: the right two people (other Obama photo, mirrored Biden),
    one missing (grey), an impostor (Eileen Collins), a duplicate (two Obama photos). The right one wins."""
    from idglow_core.faces import load_analyzer
    from idglow_core.images import load_image

    analyzer = load_analyzer("dlib")
    photo = {n: load_image(data_dir / f"{n}.jpg") for n in ("obama", "obama2", "obama3", "biden", "astronaut")}
    refs = np.stack([analyzer.analyze(photo[n])[0].embedding for n in ("obama", "biden")])
    candidates = [_side_by_side(photo["obama2"], photo["astronaut"]),                       # impostor
                  _side_by_side(photo["obama2"], np.full_like(photo["biden"], 128)),        # one missing
                  _side_by_side(photo["obama3"], photo["biden"][:, ::-1]),                  # the right people
                  _side_by_side(photo["obama2"], photo["obama3"])]                         # Obama twice
    with pytest.raises(InputError, match="128-d"):
        score_candidates(analyzer, np.zeros((2, 512)), candidates)
    scores = score_candidates(analyzer, refs, candidates)
    assert [s.faces for s in scores] == [2, 1, 2, 2]
    ranked = rank_candidates(scores)
    assert ranked[0].index == 2
    assert ranked[-1].index == 1                     # the missing face is the only count failure
    assert ranked[0].facesim.assignment.tolist() == [0, 1]  # Obama is on the left, Biden on the right
    report = ranking_report(ranked)
    assert report.splitlines()[0].startswith("#1: candidate 3, 2 face(s) for 2 reference(s); strict")
    assert "(count differs)" in report.splitlines()[-1]
