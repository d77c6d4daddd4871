"""Real faces through the dlib backend (real trained weights from PyPI; public-domain photos in tests/data)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("dlib")
if importlib.util.find_spec("face_recognition_models") is None:  # not imported: it needs pkg_resources
    pytest.skip("face-recognition-models is not installed", allow_module_level=True)

from idglow_core.errors import InputError, NoFaceError  # noqa: E402
from idglow_core.faces import DLIB_SAME_PERSON_COSINE, Face, load_analyzer, reference_faces  # noqa: E402
from idglow_core.images import load_image, save_image_atomic  # noqa: E402


@pytest.fixture(scope="module")
def analyzer():
    return load_analyzer("dlib")


@pytest.fixture(scope="module")
def photos(data_dir):
    return {n: load_image(data_dir / f"{n}.jpg") for n in ("obama", "obama2", "obama3", "biden")}


@pytest.fixture(scope="module")
def embeddings(analyzer, photos):
    return {n: reference_faces(analyzer, [img])[0].embedding for n, img in photos.items()}


def test_one_face_per_portrait_with_valid_fields(analyzer, photos):
    for name, img in photos.items():
        faces = analyzer.analyze(img)
        assert len(faces) == 1, name
        f = faces[0]
        assert isinstance(f, Face) and f.embedding.shape == (128,) and f.kps.shape == (5, 2)
        assert np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
        x1, y1, x2, y2 = f.bbox
        # the 5 points lie in the box (with a margin), eyes above mouth, left eye left of right eye
        assert np.all((f.kps[:, 0] > x1 - 10) & (f.kps[:, 0] < x2 + 10) & (f.kps[:, 1] > y1 - 10)
                      & (f.kps[:, 1] < y2 + 10)), name
        assert f.kps[0, 0] < f.kps[1, 0] and f.kps[3, 0] < f.kps[4, 0]
        assert max(f.kps[0, 1], f.kps[1, 1]) < f.kps[2, 1] < min(f.kps[3, 1], f.kps[4, 1])


def test_same_person_matches_and_different_person_does_not(embeddings):
    cos = lambda a, b: float(embeddings[a] @ embeddings[b])  # noqa: E731
    same = [cos("obama", "obama2"), cos("obama", "obama3"), cos("obama2", "obama3")]
    diff = [cos("biden", "obama"), cos("biden", "obama2"), cos("biden", "obama3")]
    logging.getLogger("idglow").info("dlib cosines same %s different %s", same, diff)
    assert min(same) > DLIB_SAME_PERSON_COSINE, same   # measured 0.944-0.968
    assert max(diff) < DLIB_SAME_PERSON_COSINE, diff   # measured 0.807-0.823
    assert min(same) - max(diff) > 0.05


def _paste_side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    h = max(left.shape[0], right.shape[0])
    canvas = np.full((h, left.shape[1] + right.shape[1], 3), 128, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1]:] = right
    return canvas


def test_composite_is_ordered_left_to_right_with_identities(analyzer, photos, embeddings):
    faces = analyzer.analyze(_paste_side_by_side(photos["biden"], photos["obama2"]))
    assert len(faces) == 2
    assert faces[0].center_x < photos["biden"].shape[1] < faces[1].center_x
    assert faces[0].embedding @ embeddings["biden"] > 0.99      # the same pixels as the biden photo
    assert faces[1].embedding @ embeddings["obama"] > DLIB_SAME_PERSON_COSINE
    assert faces[0].embedding @ embeddings["obama"] < DLIB_SAME_PERSON_COSINE


def test_group_photo_t1_gives_six_faces_left_to_right(analyzer):
    insightface = pytest.importorskip("insightface")
    t1 = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not t1.is_file():
        pytest.skip(f"{t1} is not in this insightface install")
    faces = analyzer.analyze(load_image(t1))
    assert len(faces) == 6
    xs = [f.center_x for f in faces]
    assert xs == sorted(xs)
    emb = np.stack([f.embedding for f in faces])
    off_diag = (emb @ emb.T)[~np.eye(6, dtype=bool)]
    assert off_diag.max() < DLIB_SAME_PERSON_COSINE  # six different people (measured max 0.906)


def test_grayscale_and_rgba_inputs_still_give_a_face(analyzer, photos, embeddings):
    img = photos["obama"]
    gray = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    for variant in (gray, gray[..., None], rgba):
        faces = analyzer.analyze(variant)
        assert len(faces) == 1
        assert faces[0].embedding @ embeddings["obama"] > DLIB_SAME_PERSON_COSINE


def test_reference_without_face_names_the_reference(analyzer, photos, data_dir, tmp_path):
    grey = np.full((200, 200, 3), 128, np.uint8)
    with pytest.raises(NoFaceError, match="reference image 2 of 3"):
        reference_faces(analyzer, [photos["obama"], grey, photos["biden"]])
    save_image_atomic(grey, tmp_path / "grey.png")
    with pytest.raises(NoFaceError, match=r"reference image 2 of 2 \('.*grey\.png'\)"):
        reference_faces(analyzer, [data_dir / "biden.jpg", str(tmp_path / "grey.png")])


def test_reference_faces_picks_largest_or_index(analyzer, photos, embeddings):
    big_obama = cv2.resize(photos["obama"], None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC)
    group = _paste_side_by_side(photos["biden"], big_obama)
    largest, = reference_faces(analyzer, [group])
    assert largest.embedding @ embeddings["obama"] > DLIB_SAME_PERSON_COSINE
    first, = reference_faces(analyzer, [group], indices=[0])
    assert first.embedding @ embeddings["obama"] < DLIB_SAME_PERSON_COSINE
    with pytest.raises(InputError, match="only 2 face"):
        reference_faces(analyzer, [group], indices=[5])
    with pytest.raises(InputError, match="2 face indices for 1"):
        reference_faces(analyzer, [group], indices=[0, 1])


def test_auto_falls_back_to_dlib_without_insightface_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IDGLOW_INSIGHTFACE_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_analyzer("auto").name == "dlib"
    with caplog.at_level(logging.WARNING, logger="idglow"):
        assert load_analyzer("auto", model_dir=tmp_path / "missing").name == "dlib"
    assert "det_10g.onnx" in caplog.text  # a folder the caller named but that lacks the files is reported
    with pytest.raises(InputError, match="Unknown face backend"):
        load_analyzer("mtcnn")


def test_large_images_are_detected_downscaled_but_embedded_at_full_resolution(photos, embeddings):
    from idglow_core.faces.dlib_backend import DlibAnalyzer

    big = cv2.resize(photos["obama"], None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)  # 1280 x 1600
    small_analyzer = DlibAnalyzer(detect_max_side=640)
    seen = []
    detector, *rest = small_analyzer._models

    class Spy:  # records the size of what the HOG detector is given
        def run(self, img, *args):
            seen.append(img.shape)
            return detector.run(img, *args)
    small_analyzer._models = (Spy(), *rest)
    faces = small_analyzer.analyze(big)
    assert seen == [(640, 512, 3)]
    assert len(faces) == 1
    ref = load_analyzer("dlib").analyze(photos["obama"])[0]
    # boxes and keypoints come back in full-resolution pixels (4x the original photo's; HOG boxes are coarse)
    width = float(ref.bbox[2] - ref.bbox[0]) * 4
    np.testing.assert_allclose(faces[0].bbox, ref.bbox * 4, atol=0.15 * width)
    np.testing.assert_allclose(faces[0].kps, ref.kps * 4, atol=0.05 * width)
    assert float(faces[0].embedding @ embeddings["obama"]) > DLIB_SAME_PERSON_COSINE


def test_analyzers_pickle_as_their_settings():
    import pickle

    from idglow_core.faces.dlib_backend import DlibAnalyzer

    a = pickle.loads(pickle.dumps(DlibAnalyzer(det_thresh=0.2, upsample=0, detect_max_side=900)))
    assert (a.det_thresh, a.upsample, a.detect_max_side) == (0.2, 0, 900)
