"""insightface backend on a tiny stand-in buffalo_l folder (bright-square SCRFD + random tiny iresnet)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from idglow_core.errors import InputError, ModelFormatError, ModelNotFoundError  # noqa: E402
from idglow_core.faces import load_analyzer  # noqa: E402
from idglow_core.faces.align import norm_crop  # noqa: E402
from idglow_core.faces.testing import write_tiny_buffalo  # noqa: E402

OTHER_BUFFALO_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    folder = write_tiny_buffalo(tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l")
    for name in OTHER_BUFFALO_FILES:  # not ONNX at all: loading any of them would raise
        (folder / name).write_bytes(b"not an onnx model")
    return folder


def _squares(cells, size=256, gray=0):
    """A dark image with a white 32x32 square in each (row, col) cell of the 32-px grid."""
    img = np.full((size, size, 3), gray, np.uint8)
    for r, c in cells:
        img[32 * r:32 * r + 32, 32 * c:32 * c + 32] = 255
    return img


def test_detects_orders_and_embeds_without_touching_other_models(buffalo):
    analyzer = load_analyzer("insightface", model_dir=buffalo, providers="cpu", det_size=256)
    assert analyzer.name == "insightface" and analyzer.embedding_dim == 512
    faces = analyzer.analyze(_squares([(2, 5), (4, 1), (1, 3)]))
    assert [f.bbox.tolist() for f in faces] == [[32, 128, 64, 160], [96, 32, 128, 64], [160, 64, 192, 96]]
    assert all(f.score > 0.99 and f.kps.shape == (5, 2) for f in faces)
    np.testing.assert_allclose(faces[0].kps[0], [32 + 0.3 * 32, 128 + 0.4 * 32], atol=1e-4)
    emb = np.stack([f.embedding for f in faces])
    assert emb.shape == (3, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in buffalo.iterdir()) == sorted(OTHER_BUFFALO_FILES + ("det_10g.onnx",
                                                                                      "w600k_r50.onnx"))


def test_embedding_is_onnxruntime_arcface_of_the_aligned_crop(buffalo):
    analyzer = load_analyzer("insightface", model_dir=buffalo, providers=["CPUExecutionProvider"], det_size=256)
    img = _squares([(3, 3)])
    img[96:128, 96:128, 0] = 255 - np.arange(32, dtype=np.uint8)[None] * 3  # texture, still bright
    face, = analyzer.analyze(img)
    crop = norm_crop(img, face.kps).astype(np.float32)                 # RGB
    session = ort.InferenceSession(str(buffalo / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"input.1": ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]})[0][0]
    np.testing.assert_allclose(face.embedding, raw / np.linalg.norm(raw), atol=1e-5)


def test_threshold_and_size_are_per_analyzer(buffalo):
    img = _squares([(2, 2)])
    strict = load_analyzer("insightface", model_dir=buffalo, providers="cpu", det_size=256, det_thresh=0.999)
    loose = load_analyzer("insightface", model_dir=buffalo, providers="cpu", det_size=256, det_thresh=0.5)
    assert strict.analyze(img) == [] and len(loose.analyze(img)) == 1
    assert strict.analyze(img) == []  # building `loose` did not change the strict one's threshold
    # the same white square at det_size 512: the image is scaled x2, the square covers 4 cells -> 4 boxes
    big = load_analyzer("insightface", model_dir=buffalo, providers="cpu", det_size=512)
    assert len(big.analyze(img)) == 4 and len(loose.analyze(img)) == 1
    with pytest.raises(InputError, match="multiple of 32"):
        load_analyzer("insightface", model_dir=buffalo, det_size=300)


def test_grayscale_and_rgba_inputs(buffalo):
    analyzer = load_analyzer("insightface", model_dir=buffalo, providers="cpu", det_size=256)
    rgb = _squares([(2, 2), (5, 6)])
    rgba = np.concatenate([rgb, np.full((256, 256, 1), 255, np.uint8)], axis=2)
    assert len(analyzer.analyze(rgb[..., 0])) == 2 and len(analyzer.analyze(rgba)) == 2


def test_comfyui_layouts_and_auto(buffalo, monkeypatch, tmp_path):
    insightface_root = buffalo.parent.parent          # <ComfyUI>/models/insightface
    assert load_analyzer("insightface", model_dir=insightface_root, providers="cpu").folder == buffalo
    flat = tmp_path / "insightface"
    shutil.copytree(buffalo, flat / "buffalo_l")      # <ComfyUI>/models/insightface/buffalo_l
    assert load_analyzer("insightface", model_dir=flat, providers="cpu").folder == flat / "buffalo_l"
    assert load_analyzer("auto", model_dir=insightface_root, providers="cpu").name == "insightface"
    monkeypatch.setenv("IDGLOW_INSIGHTFACE_DIR", str(insightface_root))
    assert load_analyzer("auto", providers="cpu").name == "insightface"
    with pytest.raises(InputError, match="Unknown onnxruntime provider"):
        load_analyzer("insightface", model_dir=buffalo, providers="TPU")


def test_missing_and_nested_folders_name_the_expected_files(buffalo, tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match=r"det_10g\.onnx and w600k_r50\.onnx.*buffalo_l\.zip"):
        load_analyzer("insightface", model_dir=tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(buffalo / "det_10g.onnx", partial)
    with pytest.raises(ModelNotFoundError, match=r"found only .*det_10g\.onnx"):
        load_analyzer("insightface", model_dir=partial)
    nested = tmp_path / "comfy" / "models" / "buffalo_l"
    shutil.copytree(buffalo, nested / "buffalo_l")
    for model_dir in (nested, tmp_path / "comfy"):  # the folder itself, or ComfyUI's models/insightface
        with pytest.raises(ModelNotFoundError, match=r"one folder too deep.*Move the \.onnx files up"):
            load_analyzer("insightface", model_dir=model_dir)
    monkeypatch.delenv("IDGLOW_INSIGHTFACE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="needs a model folder"):
        load_analyzer("insightface")


def test_swapped_model_files_raise_model_format_error(buffalo, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(buffalo / "det_10g.onnx", swapped / "w600k_r50.onnx")
    shutil.copy(buffalo / "w600k_r50.onnx", swapped / "det_10g.onnx")
    with pytest.raises(ModelFormatError, match="not an SCRFD detector"):
        load_analyzer("insightface", model_dir=swapped, providers="cpu")
