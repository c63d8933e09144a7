"""The `coco_format` tfds builder on a tiny COCO dataset holding every bad case."""

import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image
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


# ----------------------------------------------------------------------------- hostile records
# Each passed the build before (or raised deep inside it); a garbage compressed-RLE string
# crashed pycocotools at the first evaluation, with no annotation id to find it by.

def _good_rle_counts() -> str:
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 10:30] = 1
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


GARBAGE_RLE = {
    "words": "garbage",
    "empty": "",
    "one_char": "0",
    "punctuation": "!!!!",
    "high_bytes": "\xff\xfe",
    "nul_inside": "P0\x001",
    "truncated": _good_rle_counts()[:-3],
    "cut_mid_number": _good_rle_counts() + "o",
    "padded": _good_rle_counts() + "1",
    "other_size": mask_utils.encode(np.asfortranarray(np.ones((H, W + 1), np.uint8)))["counts"].decode(),
}


@pytest.mark.parametrize("name", list(GARBAGE_RLE))
def test_garbage_compressed_rle_is_refused(name):
    counts = GARBAGE_RLE[name]
    assert coco.segmentation_to_rle({"size": [H, W], "counts": counts}, H, W) is None
    assert coco.segmentation_to_rle({"size": [H, W], "counts": counts.encode("latin-1")}, H, W) is None


@pytest.mark.parametrize("segm", [
    {"size": [H, W], "counts": [H * W + 5, -5]},  # negative run
    {"size": [H, W], "counts": [float(H * W) + 0.5]},
    {"size": [H, W], "counts": [str(H * W)]},
    {"size": [H, W], "counts": [True] * (H * W)},
    {"size": [str(H), W], "counts": [H * W]},
    {"size": H, "counts": [H * W]},
    {"size": [H, W], "counts": None},
    [["1", 2, 3, 4, 5, 6]],
    [[1, 2, 3, True, 5, 6]],
    [[1, 2, 3, float("inf"), 5, 6]],
    "polygon",
    42,
], ids=lambda s: str(s)[:40])
def test_malformed_segmentations_are_refused(segm):
    assert coco.segmentation_to_rle(segm, H, W) is None


def test_rle_string_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for t in range(100):
        h, w = rng.integers(1, 300, 2)
        mask = (rng.random((h, w)) < [0.0, 1.0, 0.01, 0.5][t % 4]).astype(np.uint8)
        runs = coco.rle_string_counts(mask_utils.encode(np.asfortranarray(mask))["counts"])
        np.testing.assert_array_equal(runs, _runs(mask.flatten(order="F")))


def _hostile_coco(root) -> tuple[str, str, dict]:
    """Two good images (one a 16-bit greyscale PNG), hostile image and annotation records;
    returns (image_dir, json path, the counts the build must report)."""
    from segjax.testing.png import png_bytes

    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(os.path.join(image_dir, "a.png"))
    grey16 = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 27
    with open(os.path.join(image_dir, "g16.png"), "wb") as f:
        f.write(png_bytes(grey16))
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(os.path.join(image_dir, "float.tif"))
    images = [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 2, "file_name": "g16.png", "height": H, "width": W},
        {"id": 3, "file_name": "float.tif", "height": H, "width": W},  # no 8-bit scaling: corrupt
        "not an image record", None, ["id", 4],
        {"id": "5", "file_name": "a.png"}, {"id": 6.5, "file_name": "a.png"}, {"file_name": "a.png"},
        {"id": 7, "file_name": 7}, {"id": 8, "file_name": "a.png", "height": "40", "width": W},
        {"id": 9, "file_name": "a.png", "height": -H, "width": W},
    ]
    seg = {"size": [H, W], "counts": _good_rle_counts()}
    box = [10.0, 5.0, 20.0, 15.0]

    def ann(i, **kw):
        return {"id": i, "image_id": 1, "category_id": 3, "bbox": box, "iscrowd": 0, "segmentation": seg, **kw}

    annotations = [
        ann(100), ann(101, image_id=2), ann(102, id=102.0),  # good (an integral float id)
        *[ann(200 + i, segmentation={"size": [H, W], "counts": c}) for i, c in enumerate(GARBAGE_RLE.values())],
        ann(300, segmentation={"size": [H, W], "counts": [H * W + 5, -5]}),
        ann(301, segmentation=[["1", 2, 3, 4, 5, 6]]),
        "not an annotation", None, 17, ["id", 1],  # 4 bad records
        ann(400, id="400"), ann(401, id=1.5), ann(402, id=None), ann(403, id=True),
        {k: v for k, v in ann(404).items() if k != "id"},
        ann(405, image_id="1"), ann(406, category_id="3"), ann(407, category_id=3.5),  # 8 bad ids
        ann(500, image_id=99), ann(501, image_id=None), ann(502, image_id=5),  # 3 unknown images
        ann(600, category_id=4), ann(601, category_id=None),  # 2 unknown categories
        ann(700, bbox=["10", 5, 20, 15]), ann(701, bbox=[10, 5, 20]), ann(702, bbox=[10, 5, float("nan"), 1]),
        ann(703, bbox=None),  # 4 bad boxes
        ann(800, iscrowd="yes"), ann(801, iscrowd=2), ann(802, iscrowd=0.5),  # 3 more bad records
        ann(900, image_id=3),  # on the undecodable image
    ]
    counts = dict.fromkeys(coco.IMAGE_COUNTS + coco.ANNOTATION_COUNTS, 0)
    counts.update(images_in_json=12, images_written=2, bad_image_records=9, corrupt_images=1,
                  annotations_in_json=len(annotations), annotations_written=3,
                  bad_segmentation=len(GARBAGE_RLE) + 2, bad_annotation_records=4 + 3, bad_ids=8,
                  unknown_image=3, unknown_category=2, bad_bbox=4, annotations_of_skipped_images=1)
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return image_dir, ann_file, counts


def test_hostile_records_are_counted_logged_and_skipped(tmp_path, caplog):
    image_dir, ann_file, expected = _hostile_coco(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="segjax.data.coco"):
        coco.prepare_coco(tmp_path / "tfds", "hostile", {"val": (image_dir, ann_file)})
    meta = coco.dataset_metadata(tmp_path / "tfds", "hostile")
    assert meta["counts"]["val"] == expected
    # every skipped record is named by its id (or its position when it has none)
    for ann_id in [200, 205, 209, 300, 301, "'400'", 1.5, True, 405, 406, 407, 500, 600, 700, 703, 800, 802]:
        assert f"annotation {ann_id}: " in caplog.text, ann_id
    for where in ["annotations[15]: not a JSON object", "annotations[21] (no id)", "annotations[23] (no id)",
                  "images[3]: not a JSON object", "image '5': id", "image 6.5: id", "images[8]: id",
                  "image 8: height", "image 3: "]:
        assert where in caplog.text, where
    # what was written decodes and evaluates: the ground truth goes through pycocotools
    records = _by_id(coco.open_split(tmp_path / "tfds", "hostile", "val"))
    assert sorted(records) == [1, 2]
    np.testing.assert_array_equal(sorted(a for r in records.values() for a in r["objects"]["id"]), [100, 101, 102])
    gt = COCO()
    gt.dataset = coco.ground_truth(list(records.values()), meta)
    gt.createIndex()
    from pycocotools.cocoeval import COCOeval

    dets = gt.loadRes([{**a, "score": 1.0} for a in gt.dataset["annotations"]])
    ev = COCOeval(gt, dets, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    # the 16-bit PNG is scaled (v >> 8), not clipped to white
    img = decode_image(records[2]["image"])
    grey16 = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 27
    np.testing.assert_array_equal(img[..., 0], (grey16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[]", "not an object"),
    (b'{"images": [], "categories": [{"id": 1}]}', "'annotations'"),
    (b'{"annotations": [], "categories": [{"id": 1}]}', "'images'"),
    (b'{"images": [], "annotations": []}', "'categories'"),
    (b'{"images": {}, "annotations": [], "categories": [{"id": 1}]}', "'images' must be a list"),
    (b'{"images": [], "annotations": [], "categories": [{"id": "1"}]}', "categories\\[0\\].*integer"),
    (b'{"images": [], "annotations": [], "categories": ["cat"]}', "categories\\[0\\].*integer"),
], ids=["truncated", "binary", "list", "no_annotations", "no_images", "no_categories", "images_dict",
        "string_category_id", "category_not_object"])
def test_unusable_files_fail_clearly(tmp_path, content, match):
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        coco.prepare_coco(tmp_path / "tfds", "broken", {"val": (str(tmp_path / "images"), str(tmp_path / "bad.json"))})
    assert "bad.json" in str(e.value) or "split 'val'" in str(e.value)
