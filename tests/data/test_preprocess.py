"""Resizing, augmentation and ImageNet normalisation of single examples."""

import numpy as np
import pytest

from segjax.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    normalize,
    random_resized_crop_box,
)


def test_normalize_numbers():
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [51, 102, 204]]], np.uint8)  # (1, 3, 3)
    out = normalize(pixels)
    assert out.dtype == np.float32
    # (v / 255 - mean) / std by hand: 0 -> -mean/std, 255 -> (1 - mean)/std.
    np.testing.assert_allclose(out[0, 0], [-2.1179039, -2.0357143, -1.8044444], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [2.2489083, 2.4285715, 2.64], atol=1e-6)
    expected = [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225]
    np.testing.assert_allclose(out[0, 2], expected, atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_eval_resize_grey_to_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
    out = ImagePreprocess(image_size=(16, 12))({"image": grey, "label": np.int32(7)})
    assert out["image"].shape == (16, 12, 3) and out["image"].dtype == np.float32
    assert out["label"] == 7 and out["label"].dtype == np.int32
    # The three channels hold the same grey value before normalisation.
    unnorm = out["image"] * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
    np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 1], atol=1e-6)
    np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 2], atol=1e-6)
    # Same size: no resampling, exact pixels.
    same = ImagePreprocess(image_size=8)({"image": grey})
    np.testing.assert_allclose(same["image"], normalize(np.repeat(grey, 3, -1)))
    assert "label" not in same


def test_bilinear_resize_of_constant_is_constant():
    image = np.full((5, 9, 3), 77, np.uint8)
    out = ImagePreprocess(image_size=13)({"image": image})["image"]
    np.testing.assert_allclose(out, np.broadcast_to(normalize(image[:1, :1]), out.shape), atol=1e-6)


def test_random_resized_crop_box_bounds_and_determinism():
    scale = (0.2, 1.0)
    boxes = [random_resized_crop_box(np.random.default_rng(i), 40, 60, scale) for i in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 * 2400 * 0.9 <= h * w <= 2400
    assert len(set(boxes)) > 150
    assert boxes[3] == random_resized_crop_box(np.random.default_rng(3), 40, 60, scale)
    # Impossible scale falls back to the centre crop with the aspect clamped to 4/3.
    assert random_resized_crop_box(np.random.default_rng(0), 10, 40, (5.0, 5.0)) == (0, 13, 10, 13)


@pytest.mark.parametrize("hflip", [False, True])
def test_hflip_is_configurable(hflip):
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    pre = ImagePreprocess(image_size=6, hflip=hflip)
    plain = pre({"image": image})["image"]
    outs = [pre({"image": image}, np.random.default_rng(i))["image"] for i in range(20)]
    flipped = sum(np.array_equal(o, plain[:, ::-1]) for o in outs)
    unflipped = sum(np.array_equal(o, plain) for o in outs)
    assert flipped + unflipped == 20
    assert (flipped > 0 and unflipped > 0) if hflip else flipped == 0


def test_crop_only_with_rng():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    pre = ImagePreprocess(image_size=8, random_resized_crop_scale=(0.2, 0.5))
    plain = ImagePreprocess(image_size=8)({"image": image})["image"]
    np.testing.assert_array_equal(pre({"image": image})["image"], plain)
    a = pre({"image": image}, np.random.default_rng(5))["image"]
    np.testing.assert_array_equal(a, pre({"image": image}, np.random.default_rng(5))["image"])
    assert not np.array_equal(a, pre({"image": image})["image"])
    assert a.shape == (8, 8, 3)


def test_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocess(image_size=8, interpolation="lanczos")
