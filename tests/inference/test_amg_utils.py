"""Host helpers of the automatic mask generator against `segment_anything.utils.amg`
(and torchvision's NMS): exact equality unless stated."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("segment_anything")

from segment_anything.utils import amg as ref
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms

from segjax.inference.sam import amg_crops, rle
from segjax.inference.sam.box_nms import batched_nms, nms
from segjax.inference.sam.mask_regions import remove_small_regions
from segjax.inference.sam.postprocess import mask_boxes, stability_score

torch.set_num_threads(1)


def random_masks(n=6, h=23, w=31, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, h, w)) < 0.3
    m[1] = False  # empty
    m[2] = True  # full
    m[3] = False
    m[3, 5:9, 10:20] = True
    return m


@pytest.mark.parametrize("n,layers,scale", [(8, 0, 1), (32, 2, 2), (5, 1, 1), (16, 3, 2)])
def test_point_grids(n, layers, scale):
    ours = amg_crops.build_all_layer_point_grids(n, layers, scale)
    theirs = ref.build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(300, 451), (1024, 768), (97, 1500), (7, 7)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes(size, layers):
    assert amg_crops.generate_crop_boxes(size, layers, 512 / 1500) == ref.generate_crop_boxes(size, layers, 512 / 1500)


def test_uncrop_and_edges():
    rng = np.random.default_rng(1)
    boxes = rng.integers(0, 200, size=(20, 4))
    crop = [37, 50, 237, 250]
    np.testing.assert_array_equal(amg_crops.uncrop_boxes(boxes, crop),
                                  ref.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop).numpy())
    pts = rng.uniform(0, 100, size=(9, 2))
    np.testing.assert_array_equal(amg_crops.uncrop_points(pts, crop),
                                  ref.uncrop_points(torch.from_numpy(pts), crop).numpy())
    for orig in ([0, 0, 300, 400], [0, 0, 237, 250]):
        # boxes near both kinds of edge
        b = np.concatenate([boxes, [[0, 0, 200, 200], [5, 190, 195, 199], [0, 13, 100, 180]]])
        np.testing.assert_array_equal(
            amg_crops.is_box_near_crop_edge(b, crop, orig),
            ref.is_box_near_crop_edge(torch.from_numpy(b), crop, orig).numpy())
    masks = random_masks(4, 20, 30)
    np.testing.assert_array_equal(amg_crops.uncrop_masks(masks, [5, 7, 35, 27], 40, 50),
                                  ref.uncrop_masks(torch.from_numpy(masks), [5, 7, 35, 27], 40, 50).numpy())
    np.testing.assert_array_equal(amg_crops.box_xyxy_to_xywh(np.array([3, 4, 10, 20])), [3, 4, 7, 16])


def test_rle_roundtrip_and_reference():
    masks = random_masks()
    ours = rle.masks_to_rle(masks)
    theirs = ref.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert ours == theirs
    for r, m in zip(ours, masks):
        np.testing.assert_array_equal(rle.rle_to_mask(r), m)
        np.testing.assert_array_equal(rle.rle_to_mask(r), ref.rle_to_mask(r))
        assert rle.area_from_rle(r) == ref.area_from_rle(r) == int(m.sum())


def test_coco_rle():
    importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    masks = random_masks()
    for r, m in zip(rle.masks_to_rle(masks), masks):
        enc = rle.coco_encode_rle(r)
        assert enc == ref.coco_encode_rle(r) and isinstance(enc["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(dict(enc, counts=enc["counts"].encode())), m)


def test_mask_boxes_numpy_and_jnp():
    masks = random_masks(8, 17, 29, seed=3)
    theirs = ref.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(amg_crops.mask_to_box(masks), theirs)
    np.testing.assert_array_equal(np.asarray(mask_boxes(jnp.asarray(masks))), theirs)


def test_stability_score():
    logits = np.random.default_rng(4).standard_normal((5, 40, 50)).astype(np.float32) * 3
    logits[0] = -5.0  # empty low mask: 0/0
    theirs = ref.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    ours = np.asarray(stability_score(jnp.asarray(logits), 0.0, 1.0))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[1:], theirs[1:])


def random_boxes(n, seed, ties=True):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(1, 60, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    if ties:  # integer boxes and repeated scores, as the mask generator produces
        boxes = np.round(boxes)
        scores = rng.integers(0, 5, size=n).astype(np.float32) / 4
    else:
        scores = rng.random(n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("n", [0, 1, 50, 700, 1300])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_nms_matches_torchvision(n, ties, thresh):
    boxes, scores = random_boxes(n, seed=n, ties=ties)
    idxs = np.zeros(n, np.int64)
    np.testing.assert_array_equal(nms(boxes, scores, thresh),
                                  tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).numpy())
    cats = np.random.default_rng(n).integers(0, 3, size=n)
    for c in (idxs, cats):
        theirs = tv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(c), thresh)
        ours = batched_nms(boxes, scores, c, thresh)
        if n > 1000 and ties:
            # torchvision's per-category path (> 1000 boxes on CPU) re-sorts the kept boxes
            # with an unstable sort: the same set, tied scores in another order
            assert sorted(ours) == sorted(theirs.numpy()) and (np.diff(scores[ours]) <= 0).all()
        else:
            np.testing.assert_array_equal(ours, theirs.numpy())


def test_remove_small_regions_by_hand():
    m = np.zeros((12, 12), bool)
    m[1:7, 1:7] = True  # 36 px with a 1-px hole
    m[3, 3] = False
    m[9:11, 9:11] = True  # 4-px island
    m[7, 7] = True  # diagonal to the big square: 8-connected to it
    out, changed = remove_small_regions(m, 5, "holes")
    assert changed and out[3, 3] and out.sum() == m.sum() + 1
    out2, changed = remove_small_regions(out, 5, "islands")
    assert changed and not out2[9:11, 9:11].any() and out2[7, 7]
    same, changed = remove_small_regions(out2, 5, "islands")
    assert not changed and (same == out2).all()
    tiny = np.zeros((6, 6), bool)
    tiny[0, 0] = True
    tiny[4:6, 4:6] = True
    kept, changed = remove_small_regions(tiny, 10, "islands")  # all small: keep the largest
    assert changed and kept.sum() == 4 and kept[4:6, 4:6].all()


def test_remove_small_regions_matches_reference_cv2():
    importorskip("cv2")
    rng = np.random.default_rng(5)
    for i in range(6):
        m = rng.random((40, 60)) < (0.2 + 0.12 * i)
        for mode in ("holes", "islands"):
            for area in (3, 20, 100):
                ours, c1 = remove_small_regions(m, area, mode)
                theirs, c2 = ref.remove_small_regions(m, area, mode)
                assert c1 == c2
                np.testing.assert_array_equal(ours, theirs)
