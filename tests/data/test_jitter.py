"""Large-scale jitter (segjax.data.jitter) and its DetectionPreprocess option: geometry
against hand computations, padding of small images, instances leaving the crop,
determinism from the rng, static output shapes."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segjax.data import maskrcnn as maskrcnn_data
from segjax.data.jitter import JitterSample, LargeScaleJitter, mask_boxes
from segjax.ops.resample import interpolate_host


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_sample_is_detectron2s_formula():
    lsj = LargeScaleJitter(size=64, min_scale=0.1, max_scale=2.0)
    s = lsj.sample(100, 200, np.random.default_rng(3))
    ref = np.random.default_rng(3)
    scale = ref.uniform(0.1, 2.0)
    out_scale = min(scale * 64 / 100, scale * 64 / 200)
    rh, rw = int(np.round(100 * out_scale)), int(np.round(200 * out_scale))
    u = ref.uniform(0.0, 1.0)  # one draw for both axes
    assert s.scale == scale and s.resized_hw == (rh, rw)
    assert s.offset == (int(np.round(max(rh - 64, 0) * u)), int(np.round(max(rw - 64, 0) * u)))


def test_geometry_by_hand():
    # h=100, w=200, S=64, scale 1.5: output_scale = min(96/100, 96/200) = 0.48 -> 48 x 96;
    # crop offset (0, 16) -> content 48 x 64 (no rows to crop, padded below)
    lsj = LargeScaleJitter(size=64, recompute_boxes=False)
    sample = JitterSample(1.5, (48, 96), (0, 16))
    image = _image(100, 200)
    boxes = np.array([[20, 10, 60, 50],      # -> [9.6, 4.8, 28.8, 24] - 16 in x -> clipped at 0
                      [150, 10, 190, 50],    # -> [72, 4.8, 91.2, 24] - 16 -> [56, .., 75.2] -> 64
                      [180, 10, 199, 50],    # -> x from 86.4 - 16 = 70.4: right of the crop, dropped
                      [40, 20, 80, 40]], np.float32)
    out = lsj.apply(sample, image, boxes)
    np.testing.assert_array_equal(out["keep"], [0, 1, 3])
    np.testing.assert_allclose(out["boxes"], [[0, 4.8, 12.8, 24], [56, 4.8, 64, 24], [3.2, 9.6, 22.4, 19.2]],
                               rtol=0, atol=1e-5)
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image_hw"], [48, 64])
    full = interpolate_host(image, (48, 96), mode="bilinear", antialias=True)
    np.testing.assert_array_equal(out["image"][:48], full[:, 16:80])
    assert not out["image"][48:].any()


def test_image_smaller_than_the_crop_is_padded():
    lsj = LargeScaleJitter(size=64)
    # 20 x 10 at scale 0.5: output_scale = min(32/20, 32/10) = 1.6 -> 32 x 16, no crop
    out = lsj.apply(JitterSample(0.5, (32, 16), (0, 0)), _image(20, 10), np.zeros((0, 4), np.float32),
                    np.zeros((0, 20, 10), np.uint8))
    np.testing.assert_array_equal(out["image_hw"], [32, 16])
    assert out["image"].shape == (64, 64, 3) and not out["image"][32:].any() and not out["image"][:, 16:].any()
    assert out["masks"].shape == (0, 64, 64) and out["boxes"].shape == (0, 4)
    # and through sample(): the smallest scale of a tiny image never fails
    for seed in range(5):
        s = LargeScaleJitter(size=64, min_scale=0.1, max_scale=0.1).sample(3, 2, np.random.default_rng(seed))
        assert min(s.resized_hw) >= 1 and s.offset == (0, 0)


def test_masks_follow_and_boxes_are_recomputed_from_them():
    h, w = 40, 40
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 5:15, 5:15] = 1     # zoomed x2: 10..29, cut by the 24 crop at 24
    masks[1, 30:40, 30:40] = 1   # zoomed: 60..79, outside the crop
    masks[2, 10:30, 18:26] = 1   # zoomed: columns 36..51, outside
    boxes = mask_boxes(masks)
    np.testing.assert_array_equal(boxes[0], [5, 5, 15, 15])
    out = LargeScaleJitter(size=24).apply(JitterSample(2.0, (80, 80), (0, 0)), _image(h, w), boxes, masks)
    np.testing.assert_array_equal(out["keep"], [0])
    assert out["masks"].shape == (1, 24, 24)
    want = np.zeros((24, 24), np.uint8)
    want[10:24, 10:24] = 1
    np.testing.assert_array_equal(out["masks"][0], want)
    np.testing.assert_array_equal(out["boxes"], [[10, 10, 24, 24]])
    np.testing.assert_array_equal(mask_boxes(np.zeros((1, 3, 3), np.uint8)), [[0, 0, 0, 0]])


def test_instance_cut_by_the_crop_keeps_its_visible_part():
    h, w = 40, 40
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 2:10, 2:10] = 1
    masks[1, 4:12, 8:16] = 1   # zoomed x2: columns 16..31 -> visible 16..23 in a 24 crop
    out = LargeScaleJitter(size=24).apply(JitterSample(2.0, (80, 80), (0, 0)), _image(h, w),
                                          mask_boxes(masks), masks)
    np.testing.assert_array_equal(out["keep"], [0, 1])
    np.testing.assert_array_equal(out["boxes"], [[4, 4, 20, 20], [16, 8, 24, 24]])


def test_deterministic_from_the_rng():
    lsj = LargeScaleJitter(size=32)
    image, boxes = _image(50, 70), np.array([[5, 5, 40, 30]], np.float32)
    a = lsj(image, boxes, None, np.random.default_rng(7))
    b = lsj(image, boxes, None, np.random.default_rng(7))
    c = lsj(image, boxes, None, np.random.default_rng(8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])


def test_bad_settings():
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        LargeScaleJitter(min_scale=2.0, max_scale=0.1)
    with pytest.raises(ValueError, match="does not fit pad_size"):
        maskrcnn_data.DetectionPreprocess(pad_size=(512, 512), lsj=LargeScaleJitter(size=1024))


def _example(h, w, boxes, labels):
    masks = np.zeros((len(boxes), h, w), np.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, np.asarray(boxes, int)):
        m[y1:y2, x1:x2] = 1
    rle = np.empty(len(boxes), object)
    rle[:] = [mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks]
    return {"image": _image(h, w), "image_id": np.int64(1), "objects": {
        "bbox": np.asarray(boxes, np.float32), "label": np.asarray(labels, np.int64),
        "iscrowd": np.zeros(len(boxes), bool), "rle": rle}}


def test_detection_preprocess_with_lsj_static_shapes_and_aligned_labels():
    pre = maskrcnn_data.DetectionPreprocess(min_size=64, max_size=64, pad_size=(64, 64), max_instances=4,
                                            hflip=True, lsj=LargeScaleJitter(size=64, min_scale=0.5,
                                                                             max_scale=2.0))
    ex = _example(48, 64, [[2, 2, 20, 20], [40, 30, 62, 46], [25, 5, 35, 40]], [1, 2, 3])
    seen_drop = False
    for seed in range(12):
        row = pre(ex, np.random.default_rng(seed))
        assert row["image"].shape == (64, 64, 3) and row["masks"].shape == (4, 64, 64)
        assert row["boxes"].shape == (4, 4) and row["labels"].shape == (4,)
        n = int(row["valid"].sum())
        seen_drop |= n < 3
        for i in range(n):  # each kept box is its own mask's tight box, with its own label
            np.testing.assert_array_equal(row["boxes"][i], mask_boxes(row["masks"][i:i + 1])[0])
            assert row["labels"][i] in (1, 2, 3)
        assert not row["masks"][n:].any() and not row["labels"][n:].any()
        hh, ww = row["image_hw"]
        assert not row["image"][hh:].any() and not row["image"][:, ww:].any()
    assert seen_drop  # some crops leave instances out
    # evaluation (no rng): the plain resize, as without lsj
    plain = maskrcnn_data.DetectionPreprocess(min_size=64, max_size=64, pad_size=(64, 64), max_instances=4)
    for k, v in plain(ex).items():
        np.testing.assert_array_equal(pre(ex)[k], v)
