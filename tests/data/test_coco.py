"""The `coco_format` tfds builder on a tiny COCO dataset holding every bad case."""

import json
import logging
import os
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segjax.data import coco
from segjax.data.decode import decode_image
from segjax.testing.coco_fixture import CATEGORIES, EXPECTED_COUNTS, H, W, _runs, write_tiny_coco


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data_dir, json path): the tiny dataset prepared as coco_format/tiny (train and val
    splits from the same JSON)."""
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    image_dir, ann_file = write_tiny_coco(root)
    data_dir = os.path.join(root, "tfds")
    coco.prepare_coco(data_dir, "tiny", {"train": (image_dir, ann_file), "val": (image_dir, ann_file)})
    return data_dir, ann_file


def _by_id(source):
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


def test_counts_in_metadata_and_records(tiny):
    data_dir, _ = tiny
    meta = coco.dataset_metadata(data_dir, "tiny")
    for split in ("train", "val"):
        assert meta["counts"][split] == EXPECTED_COUNTS
    records = _by_id(coco.open_split(data_dir, "tiny", "train"))
    assert sorted(records) == [1, 2, 7]
    assert "tensorflow" not in sys.modules


def test_category_mapping_is_contiguous_and_sorted(tiny):
    data_dir, _ = tiny
    meta = coco.dataset_metadata(data_dir, "tiny")
    assert meta["category_ids"] == [3, 7, 11]
    assert meta["category_names"] == ["cat", "dog", "emu"]
    assert coco.num_classes(meta) == 4
    obj = _by_id(coco.open_split(data_dir, "tiny", "train"))[1]["objects"]
    lookup = {3: 1, 7: 2, 11: 3}
    np.testing.assert_array_equal(obj["label"], [lookup[int(c)] for c in obj["category_id"]])


def test_record_content_matches_pycocotools(tiny):
    data_dir, ann_file = tiny
    gt = COCO(ann_file)
    rec = _by_id(coco.open_split(data_dir, "tiny", "train"))[1]
    image = decode_image(rec["image"])
    assert image.shape == (H, W, 3) and (int(rec["height"]), int(rec["width"])) == (H, W)
    obj = rec["objects"]
    np.testing.assert_array_equal(obj["id"], [10, 11, 12, 14, 20])
    np.testing.assert_array_equal(obj["iscrowd"], [False, True, False, False, False])
    # XYXY, clamped to the image (annotation 12 runs past the right edge).
    np.testing.assert_allclose(obj["bbox"], [[10, 5, 30, 25], [30, 5, 50, 15], [2, 20, 60, 35],
                                             [40, 30, 40.5, 36], [45, 20, 59, 39]])
    for i, ann_id in enumerate(obj["id"]):
        expected = gt.annToMask(gt.anns[int(ann_id)])
        got = mask_utils.decode({"size": [H, W], "counts": bytes(obj["rle"][i])})
        np.testing.assert_array_equal(got, expected, err_msg=f"annotation {ann_id}")
    # `area` is the JSON's where given, else the mask's (annotation 12 has none).
    np.testing.assert_allclose(obj["area"][[0, 1, 3, 4]], [200, 200, 3, 100])
    assert obj["area"][2] == gt.annToMask(gt.anns[12]).sum() == 150


def test_empty_greyscale_and_palette_images(tiny):
    data_dir, _ = tiny
    records = _by_id(coco.open_split(data_dir, "tiny", "val"))
    grey = records[2]
    assert decode_image(grey["image"]).shape == (30, 20, 1)
    assert grey["objects"]["bbox"].shape == (0, 4) and len(grey["objects"]["rle"]) == 0
    assert decode_image(records[7]["image"]).shape == (24, 32, 3)


def test_ground_truth_roundtrip_equals_source_less_skipped(tiny):
    data_dir, ann_file = tiny
    meta = coco.dataset_metadata(data_dir, "tiny")
    src = coco.open_split(data_dir, "tiny", "train")
    gt = coco.ground_truth([src[i] for i in range(len(src))], meta)
    with open(ann_file) as f:
        original = json.load(f)
    kept = {10, 11, 12, 14, 20, 21}
    by_id = {a["id"]: a for a in original["annotations"]}
    assert sorted(im["id"] for im in gt["images"]) == [1, 2, 7]
    assert len(gt["annotations"]) == len(kept)
    assert gt["categories"] == sorted(CATEGORIES, key=lambda c: c["id"])
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    # Masks and categories survive the trip (matched by position in the image).
    for ann in gt["annotations"]:
        src_ids = [a for a in kept if by_id[a]["image_id"] == ann["image_id"]]
        matches = [a for a in src_ids if by_id[a]["category_id"] == ann["category_id"]
                   and np.array_equal(COCO.annToMask(coco_gt, ann),
                                      _original_mask(original, by_id[a]))]
        assert matches, ann


def _original_mask(original, ann):
    c = COCO()
    c.dataset = original
    c.createIndex()
    return c.annToMask(ann)


def test_prepare_is_idempotent_and_logs_counts(tmp_path, caplog):
    image_dir, ann_file = write_tiny_coco(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="segjax.data.coco"):
        coco.prepare_coco(tmp_path / "tfds", "again", {"train": (image_dir, ann_file)})
    assert "corrupt" in caplog.text and "wrote 3 of 7 images" in caplog.text
    path = coco.dataset_dir(tmp_path / "tfds", "again")
    mtime = os.stat(os.path.join(path, "dataset_info.json")).st_mtime_ns
    coco.prepare_coco(tmp_path / "tfds", "again", {"train": (image_dir, ann_file)})
    assert os.stat(os.path.join(path, "dataset_info.json")).st_mtime_ns == mtime


def test_segmentation_to_rle_formats():
    h, w = 8, 10
    poly = coco.segmentation_to_rle([[1, 1, 6, 1, 6, 5, 1, 5]], h, w)
    mask = mask_utils.decode(poly)
    assert mask.shape == (h, w) and mask.sum() > 0 and isinstance(poly["counts"], bytes)
    # uncompressed and compressed forms of the same mask
    runs = mask_utils.encode(np.asfortranarray(mask))
    assert coco.segmentation_to_rle({"size": [h, w], "counts": runs["counts"].decode()}, h, w) == poly
    counts = _runs(mask.flatten(order="F"))
    assert sum(counts) == h * w
    assert coco.segmentation_to_rle({"size": [h, w], "counts": counts}, h, w) == poly
    # malformed: wrong size, bad sums, short polygons, other types
    assert coco.segmentation_to_rle({"size": [h + 1, w], "counts": counts}, h, w) is None
    assert coco.segmentation_to_rle({"size": [h, w], "counts": counts[:-1]}, h, w) is None
    assert coco.segmentation_to_rle([[1, 2, 3, 4]], h, w) is None
    assert coco.segmentation_to_rle([], h, w) is None
    assert coco.segmentation_to_rle(None, h, w) is None
    assert coco.segmentation_to_rle([[1, 2, 3, float("nan"), 4, 5]], h, w) is None


def test_categories_must_agree_across_splits(tmp_path):
    image_dir, ann_file = write_tiny_coco(str(tmp_path))
    with open(ann_file) as f:
        other = json.load(f)
    other["categories"] = other["categories"][:2]
    other_file = str(tmp_path / "other.json")
    with open(other_file, "w") as f:
        json.dump(other, f)
    with pytest.raises(ValueError, match="other categories"):
        coco.prepare_coco(tmp_path / "tfds", "mixed", {"train": (image_dir, ann_file),
                                                        "val": (image_dir, other_file)})


def test_not_prepared_and_bad_name_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_format/nothing is not prepared"):
        coco.open_split(tmp_path, "nothing", "train")
    with pytest.raises(ValueError, match="dataset name"):
        coco.dataset_dir(tmp_path, "Bad-Name")
