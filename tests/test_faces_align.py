"""ArcFace 5-point alignment: hand-worked similarity fits, agreement with scikit-image/insightface, torch grads."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from idglow_core.errors import InputError
from idglow_core.faces.align import (ARCFACE_DST, arcface_template, estimate_similarity,
                                     estimate_similarity_torch, norm_crop)


def test_exact_similarity_is_recovered_by_hand():
    # dst = 2 * Rot(90 deg) @ src + (3, 4): (1,0)->(3,6), (0,1)->(1,4)
    src = np.array([[0, 0], [1, 0], [0, 1]], float)
    dst = np.array([[3, 4], [3, 6], [1, 4]], float)
    np.testing.assert_allclose(estimate_similarity(src, dst), [[0, -2, 3], [2, 0, 4]], atol=1e-12)


def test_mirror_image_fit_has_no_reflection():
    # dst is src mirrored in y. Worked by hand: centred src (-1,-1/3), (1,-1/3), (0,2/3); centred dst
    # (-1,1/3), (1,1/3), (0,-2/3); var = 8/3, sum dot = 4/3 -> a = 1/2; sum cross = 0 -> b = 0;
    # t = mean(dst) - a * mean(src) = (0, -1/3) - (0, 1/6) = (0, -1/2).
    src = np.array([[-1, 0], [1, 0], [0, 1]], float)
    dst = np.array([[-1, 0], [1, 0], [0, -1]], float)
    np.testing.assert_allclose(estimate_similarity(src, dst), [[0.5, 0, 0], [0, 0.5, -0.5]], atol=1e-12)


def test_matches_scikit_image_and_insightface_estimate_norm():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(0)
    for _ in range(5):
        kps = ARCFACE_DST * rng.uniform(1, 4) + rng.uniform(0, 300, 2) + rng.normal(0, 3, (5, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tform = skimage_transform.SimilarityTransform()
            tform.estimate(kps, ARCFACE_DST)
        np.testing.assert_allclose(estimate_similarity(kps, ARCFACE_DST), tform.params[:2], rtol=1e-6, atol=1e-5)
    face_align = pytest.importorskip("insightface.utils.face_align")
    for size in (112, 128, 224):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            expected = face_align.estimate_norm(kps.astype(np.float32), size)
        np.testing.assert_allclose(estimate_similarity(kps, arcface_template(size)), expected, atol=1e-4)


def test_torch_version_matches_numpy_batched_and_has_gradients():
    rng = np.random.default_rng(1)
    kps = np.stack([ARCFACE_DST * s + off for s, off in ((1.5, 10), (3.0, 200), (0.7, -5))])
    kps = kps + rng.normal(0, 2, kps.shape)
    expected = np.stack([estimate_similarity(k) for k in kps])
    src = torch.tensor(kps, dtype=torch.float64, requires_grad=True)
    got = estimate_similarity_torch(src)
    assert got.shape == (3, 2, 3)
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(estimate_similarity_torch(src[0]).detach().numpy(), expected[0], atol=1e-10)
    got[:, 0, 2].sum().backward()  # translation depends on every keypoint
    assert torch.isfinite(src.grad).all() and (src.grad.abs().sum((1, 2)) > 0).all()


def test_norm_crop_puts_keypoints_on_the_template():
    image = np.zeros((300, 300, 3), np.uint8)
    kps = ARCFACE_DST * 2.0 + np.array([40.0, 60.0])
    for x, y in kps.astype(int):
        image[y - 2:y + 3, x - 2:x + 3] = 255       # bright 5x5 dot at each keypoint
    crop = norm_crop(image, kps)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_DST.round().astype(int):
        assert crop[y, x].min() > 200                 # each dot lands on its template point (scale 1/2)
    assert crop[5, 5].max() == 0 and crop[105, 56].max() == 0


def test_bad_keypoints_raise_typed_errors():
    with pytest.raises(InputError, match="Keypoints must be"):
        estimate_similarity(np.zeros((4, 2)))
    with pytest.raises(InputError, match="coincide"):
        estimate_similarity(np.ones((5, 2)))
    with pytest.raises(InputError, match="H, W, C"):
        norm_crop(np.zeros((10, 10)), ARCFACE_DST)
