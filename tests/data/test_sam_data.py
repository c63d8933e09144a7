"""SAM data: resize geometry shared by image and masks, mask filters, seeded sampling, loaders."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data import sam
from segjax.data.sam import SamPreprocess, SamSource, block_mask, resize_mask
from segjax.inference.sam.transforms import preprocess_shape, resize_image
from segjax.testing.sa1b_fixture import write_sa1b


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def _record(image, masks, iscrowd=None):
    h, w = image.shape[:2]
    n = len(masks)
    rles = np.empty(n, object)
    rles[:] = [_rle(m) for m in masks]
    return {"image": image, "height": h, "width": w, "index": 3,
            "objects": {"rle": rles, "iscrowd": np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd)}}


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_masks_follow_the_image_geometry():
    h0, w0 = 60, 90
    obj = _rect(h0, w0, 7, 31, 13, 50)
    image = np.where(obj[..., None], 255, 0).astype(np.uint8).repeat(3, axis=-1)
    rec = _record(image, [obj])
    s, g = 64, 16
    h, w = preprocess_shape(h0, w0, s)
    full = SamPreprocess(img_size=s, mask_size=None, max_masks=2)(rec)
    resized = resize_image(image, s)
    assert full["image_hw"].tolist() == [h, w] == list(resized.shape[:2])
    np.testing.assert_array_equal(full["image"][:h, :w], resized)
    assert not full["image"][h:].any() and not full["image"][:, w:].any()
    # The mask goes through the image's own filter: it is where the resized white object is.
    np.testing.assert_array_equal(full["masks"][0, :h, :w], resized[..., 0] >= 128)
    assert not full["masks"][0, h:].any() and full["valid"].tolist() == [True, False]
    ys, xs = np.nonzero(full["masks"][0])
    np.testing.assert_array_equal(full["boxes"][0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # At G: the mean of each (S/G)^2 block of the padded mask, kept where >= 0.5.
    low = SamPreprocess(img_size=s, mask_size=g, max_masks=2)(rec)
    blocks = full["masks"][0].reshape(g, s // g, g, s // g).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(low["masks"][0], blocks)
    np.testing.assert_array_equal(low["boxes"], full["boxes"])
    assert low["masks"].shape == (2, g, g) and low["index"] == 3


def test_resize_mask_is_pils_resize_and_blocks_are_block_means():
    rng = np.random.default_rng(0)
    disagree = total = 0
    for _ in range(60):
        big_h, big_w = rng.integers(5, 120, 2)
        h, w = preprocess_shape(big_h, big_w, int(rng.choice([16, 64, 100, 160])))
        kind = rng.integers(3)
        if kind == 0:  # noise
            mask = rng.random((big_h, big_w)) < 0.3
        elif kind == 1:  # a small blob somewhere
            y, x = rng.integers(0, big_h), rng.integers(0, big_w)
            mask = _rect(big_h, big_w, y, y + rng.integers(1, 9), x, x + rng.integers(1, 9))
        else:
            mask = np.zeros((big_h, big_w), bool)
        image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        two_pass = np.asarray(image.resize((w, big_h), Image.BILINEAR).resize((w, h), Image.BILINEAR))
        np.testing.assert_array_equal(resize_mask(mask, (h, w)), two_pass >= 128)
        pil = np.asarray(image.resize((w, h), Image.BILINEAR))
        disagree += ((pil >= 128) != (two_pass >= 128)).sum()
        total += pil.size
        s = max(h, w) + int(rng.integers(0, 3)) * 16
        s += (-s) % 4
        dense = np.zeros((s, s))
        dense[:h, :w] = pil >= 128
        g = s // 4
        np.testing.assert_array_equal(block_mask(pil >= 128, 4, g), dense.reshape(g, 4, g, 4).mean((1, 3)) >= 0.5)
    assert disagree <= 1e-3 * total  # Pillow's one-call resize: the same but for rare 127 / 128 pixels


def test_mask_filters():
    h, w = 40, 50
    masks = [np.ones((h, w), bool),                         # whole image: dropped
             _rect(h, w, 0, 39, 0, 48),                     # 0.936 of it: dropped
             np.zeros((h, w), bool),                        # empty: dropped
             _rect(h, w, 5, 15, 5, 15),                     # crowd: dropped
             _rect(h, w, 20, 30, 20, 35),                   # kept
             _rect(h, w, 2, 3, 40, 41)]                     # one pixel: empty at G, kept at S
    rec = _record(np.zeros((h, w, 3), np.uint8), masks, iscrowd=[0, 0, 0, 1, 0, 0])
    pre = SamPreprocess(img_size=64, mask_size=16, max_masks=4)
    assert pre.candidates(rec).tolist() == [4, 5]
    assert [c[0] for c in pre.select(rec, None)] == [4]
    assert [c[0] for c in SamPreprocess(img_size=64, mask_size=None).select(rec, None)] == [4, 5]
    out = pre(rec)
    assert out["valid"].tolist() == [True, False, False, False] and not out["masks"][1:].any()
    assert pre.usable(rec)
    assert not pre.usable(_record(np.zeros((h, w, 3), np.uint8), masks[:4] + masks[5:], iscrowd=[0, 0, 0, 1, 0]))
    assert SamPreprocess(img_size=64, mask_size=16, max_area_fraction=0.95).candidates(rec).tolist() == [1, 4, 5]
    sliver = _record(np.zeros((1, 300, 3), np.uint8), [np.ones((1, 300), bool)])  # resizes to 0 x 64
    assert not pre.usable(sliver) and not len(SamPreprocess(64, 16, max_area_fraction=1.0).candidates(sliver))
    with pytest.raises(ValueError, match="divide"):
        SamPreprocess(img_size=64, mask_size=24)


def test_sampling_is_seeded_and_uniform_over_survivors():
    h, w = 48, 48
    masks = [_rect(h, w, 4 * i, 4 * i + 4, 0, 8 + 4 * i) for i in range(10)]
    rec = _record(np.zeros((h, w, 3), np.uint8), masks)
    pre = SamPreprocess(img_size=48, mask_size=12, max_masks=4)
    picks = [tuple(c[0] for c in pre.select(rec, np.random.default_rng(seed))) for seed in range(40)]
    assert all(len(p) == 4 and len(set(p)) == 4 and list(p) == sorted(p) for p in picks)
    assert picks[0] == tuple(c[0] for c in pre.select(rec, np.random.default_rng(0)))  # deterministic
    assert len(set(picks)) > 20  # not always the same subset
    counts = np.bincount(np.concatenate(picks), minlength=10)
    assert counts.min() > 0  # every mask gets picked
    out = pre(rec, np.random.default_rng(0))
    assert out["valid"].all()


def test_flip_moves_image_and_masks_together():
    h0, w0 = 30, 64
    obj = _rect(h0, w0, 5, 25, 4, 20)
    image = np.where(obj[..., None], 255, 0).astype(np.uint8).repeat(3, axis=-1)
    rec = _record(image, [obj])
    pre = SamPreprocess(img_size=64, mask_size=None, max_masks=1, hflip=True)
    outs = [pre(rec, np.random.default_rng(seed)) for seed in range(8)]
    flipped = [o for o in outs if o["image"][:, 40:].any()]
    assert 0 < len(flipped) < len(outs)  # both orientations occur
    for o in outs:
        h, w = o["image_hw"]
        np.testing.assert_array_equal(o["masks"][0, :h, :w], o["image"][:h, :w, 0] >= 128)
    box = flipped[0]["boxes"][0]
    assert box[0] == 64 - 20 and box[2] == 64 - 4


def test_source_substitutes_unusable_records():
    h, w = 32, 32
    good = _record(np.zeros((h, w, 3), np.uint8), [_rect(h, w, 2, 20, 2, 20)])
    no_masks = _record(np.zeros((h, w, 3), np.uint8), [np.ones((h, w), bool)])
    corrupt = dict(good, image=b"not an image")
    pre = SamPreprocess(img_size=32, mask_size=8, max_masks=2)
    source = SamSource([no_masks, corrupt, good], pre)
    assert source[0]["index"] == 2 and source[1]["index"] == 2
    assert source.num_without_masks == 1 and source.num_corrupt == 1


@pytest.fixture(scope="module")
def sa1b_config(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sam_data"))
    write_sa1b(os.path.join(root, "train"), n=6)
    write_sa1b(os.path.join(root, "val"), n=3)
    return ml_collections.ConfigDict({
        "seed": 0, "batch_size": 4, "eval_batch_size": 2, "eval": {"max_images": 0},
        "data": {"kind": "sa1b", "dataset": "tiny", "root": root, "data_dir": os.path.join(root, "tfds"),
                 "splits": {"train": "{root}/train", "val": ["{root}/val"]}, "img_size": 64, "mask_size": 0,
                 "max_masks": 3, "max_area_fraction": 0.9, "hflip": True}})


def test_loaders(sa1b_config):
    loader = sam.make_loader(sa1b_config, "train", 0, 1, train=True)
    batch = loader.get_batch(2)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {"image": ((4, 64, 64, 3), np.float32), "image_hw": ((4, 2), np.int32),
                      "masks": ((4, 3, 16, 16), np.bool_), "boxes": ((4, 3, 4), np.float32),
                      "valid": ((4, 3), np.bool_), "index": ((4,), np.int32)}
    assert batch["valid"][:, 0].all() and (batch["masks"].any(axis=(2, 3)) == batch["valid"]).all()
    # A batch is a pure function of (seed, step): again, and from a resumed stream.
    again = sam.make_loader(sa1b_config, "train", 0, 1, train=True)
    it = again.iterate(start_step=2)
    step, resumed = next(it)
    it.close()
    assert step == 2
    for k in batch:
        np.testing.assert_array_equal(resumed[k], batch[k])
    # Two processes split the global batch.
    half = sam.make_loader(sa1b_config, "train", 1, 2, train=True).get_batch(2)
    np.testing.assert_array_equal(half["masks"], batch["masks"][2:])

    evaluation = sam.make_loader(sa1b_config, "val", 0, 1, train=False)
    batches = list(evaluation)
    assert len(batches) == 2 and batches[0]["masks"].shape == (2, 3, 64, 64)
    assert [b["example_valid"].tolist() for b in batches] == [[True, True], [True, False]]
    assert sum(1 for _ in sam.iterate_examples(batches)) == 3


def test_config_errors(sa1b_config):
    bad = ml_collections.ConfigDict(sa1b_config.to_dict())
    bad.data.kind = "voc"
    with pytest.raises(ValueError, match="kind"):
        sam.make_loader(bad, "train", 0, 1, train=True)
    bad.data.kind = "coco"
    bad.data.dataset = ""
    with pytest.raises(ValueError, match="dataset"):
        sam.make_loader(bad, "train", 0, 1, train=True)


def test_shapes_kind_reads_coco_format_as_class_agnostic_masks(tmp_path):
    config = ml_collections.ConfigDict({
        "seed": 1, "batch_size": 2, "eval_batch_size": 2,
        "data": {"kind": "shapes", "data_dir": str(tmp_path), "img_size": 64, "max_masks": 4,
                 "shapes": {"image_size": 48, "num_train": 4, "num_val": 2, "max_objects": 3}}})
    batch = sam.make_loader(config, "train", 0, 1, train=True).get_batch(0)
    assert batch["masks"].shape == (2, 4, 16, 16) and batch["image_hw"].tolist() == [[64, 64]] * 2
    assert batch["valid"].any(axis=1).all()
    # Each valid mask is one object: its box holds its G-resolution pixels (4 px per cell).
    for b, m in zip(*np.nonzero(batch["valid"])):
        ys, xs = np.nonzero(batch["masks"][b, m])
        x1, y1, x2, y2 = batch["boxes"][b, m]
        assert x1 <= 4 * xs.min() + 2 and 4 * xs.max() + 2 <= x2 and y1 <= 4 * ys.min() + 2 and 4 * ys.max() + 2 <= y2
