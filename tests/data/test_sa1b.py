"""The `sa1b_format` tfds builder on a small SA-1B-format folder holding every bad case."""

import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segjax.data import sa1b
from segjax.data.decode import decode_image
from segjax.testing.sa1b_fixture import BAD_COUNTS, write_sa1b


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, {image_id: [(H, W) bool masks]} of the good images)."""
    root = str(tmp_path_factory.mktemp("sa1b"))
    truth = write_sa1b(os.path.join(root, "src"), n=4, bad=True)
    write_sa1b(os.path.join(root, "val"), n=2)
    data_dir = os.path.join(root, "tfds")
    sa1b.prepare_sa1b(data_dir, "tiny", {"train": os.path.join(root, "src"), "val": [os.path.join(root, "val")]})
    return data_dir, truth


def _records(data_dir, split="train"):
    source = sa1b.open_split(data_dir, "tiny", split)
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


def test_counts(prepared):
    data_dir, truth = prepared
    counts = sa1b.dataset_metadata(data_dir, "tiny")["counts"]["train"]
    assert {k: counts[k] for k in BAD_COUNTS} == BAD_COUNTS
    # The good images, plus sa_107 (one good mask of four) and sa_108 (no annotations).
    assert counts["json_files"] == 4 + 9
    assert counts["images_written"] == 4 + 2 and counts["images_without_annotations"] == 1
    assert counts["annotations_written"] == sum(len(m) for m in truth.values()) + 1
    assert sorted(_records(data_dir)) == [1, 2, 3, 4, 107, 108]
    assert sorted(_records(data_dir, "val")) == [1, 2]


def test_records_hold_the_masks(prepared):
    data_dir, truth = prepared
    records = _records(data_dir)
    for image_id, masks in truth.items():
        r = records[image_id]
        h, w = int(r["height"]), int(r["width"])
        assert decode_image(r["image"]).shape == (h, w, 3)
        obj = r["objects"]
        decoded = mask_utils.decode([{"size": [h, w], "counts": c} for c in obj["rle"]]).transpose(2, 0, 1)
        np.testing.assert_array_equal(decoded, np.stack(masks).astype(np.uint8))
        np.testing.assert_array_equal(obj["area"], [m.sum() for m in masks])
        for box, m in zip(obj["bbox"], masks):
            ys, xs = np.nonzero(m)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(obj["predicted_iou"], 0.9)
    assert len(records[108]["objects"]["rle"]) == 0 and records[108]["objects"]["bbox"].shape == (0, 4)


def test_prepare_is_idempotent_and_errors_name_the_problem(prepared, tmp_path):
    data_dir, _ = prepared
    before = os.path.getmtime(os.path.join(sa1b.dataset_dir(data_dir, "tiny"), "dataset_info.json"))
    sa1b.prepare_sa1b(data_dir, "tiny", {"train": "/does/not/matter"})  # prepared: never rebuilt
    assert os.path.getmtime(os.path.join(sa1b.dataset_dir(data_dir, "tiny"), "dataset_info.json")) == before
    with pytest.raises(FileNotFoundError, match="prepare_sa1b"):
        sa1b.open_split(data_dir, "other", "train")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        sa1b.prepare_sa1b(str(tmp_path), "missing", {"train": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="dataset name"):
        sa1b.prepare_sa1b(str(tmp_path), "Bad Name", {"train": str(tmp_path)})
