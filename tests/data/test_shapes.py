"""The generated `shapes` dataset: deterministic, consistent masks/boxes, readable as coco_format."""

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from segjax.data import coco, shapes

SPEC = shapes.ShapesSpec(image_size=64, num_train=12, num_val=4, max_objects=4, min_size=10, max_size=28)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return data_dir, shapes.prepare_shapes(data_dir, SPEC)


def test_generation_is_deterministic_and_varied():
    a_img, a_obj = shapes.generate_image(SPEC, "train", 3)
    b_img, b_obj = shapes.generate_image(SPEC, "train", 3)
    np.testing.assert_array_equal(a_img, b_img)
    assert [o["label"] for o in a_obj] == [o["label"] for o in b_obj]
    for x, y in zip(a_obj, b_obj):
        np.testing.assert_array_equal(x["mask"], y["mask"])
    assert not np.array_equal(a_img, shapes.generate_image(SPEC, "train", 4)[0])
    assert not np.array_equal(a_img, shapes.generate_image(SPEC, "val", 3)[0])
    other_seed = shapes.ShapesSpec(**{**SPEC.__dict__, "seed": 1})
    assert not np.array_equal(a_img, shapes.generate_image(other_seed, "train", 3)[0])


def test_instances_are_disjoint_visible_and_in_range():
    labels = []
    for i in range(30):
        image, objects = shapes.generate_image(SPEC, "train", i)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= SPEC.max_objects
        masks = np.stack([o["mask"] for o in objects])
        assert masks.sum(0).max() <= 1  # visible parts never overlap
        assert masks.reshape(len(objects), -1).sum(1).min() > 0
        labels += [o["label"] for o in objects]
    assert set(labels) == {1, 2, 3}


def test_occluded_object_keeps_most_of_its_area():
    # Each later placement covers at most max_occlusion of an earlier object's
    # then-visible area, so object k of n keeps >= (1 - 0.4) ** (n - 1 - k) of its shape.
    occluded = 0
    for i in range(40):
        _, objects = shapes.generate_image(SPEC, "val", i)
        n = len(objects)
        for k, o in enumerate(objects):
            visible = o["mask"].sum()
            assert visible >= (1 - SPEC.max_occlusion) ** (n - 1 - k) * o["full_area"] - 1e-9
            occluded += visible < o["full_area"]
    assert occluded > 0  # overlaps do happen


def test_coco_json_and_tfds_agree(prepared):
    data_dir, name = prepared
    assert name == SPEC.name
    root = os.path.join(data_dir, "shapes_coco", name)
    gt = COCO(os.path.join(root, "annotations", "instances_val.json"))
    assert len(gt.getImgIds()) == 4
    meta = coco.dataset_metadata(data_dir, name)
    assert meta["category_names"] == list(shapes.CLASSES) and meta["category_ids"] == [1, 2, 3]
    assert meta["counts"]["train"]["images_written"] == 12
    assert meta["counts"]["val"]["annotations_written"] == len(gt.getAnnIds())
    src = coco.open_split(data_dir, name, "val")
    assert len(src) == 4
    for i in range(len(src)):
        rec = src[i]
        image_id = int(rec["image_id"])
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        obj = rec["objects"]
        assert len(obj["id"]) == len(anns)
        for ann, box, label in zip(anns, obj["bbox"], obj["label"]):
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(box, [x, y, x + w, y + h])
            assert label == ann["category_id"]
            # tight boxes around the visible mask
            mask = gt.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_prepare_twice_is_a_no_op(prepared):
    data_dir, name = prepared
    info = os.path.join(coco.dataset_dir(data_dir, name), "dataset_info.json")
    mtime = os.stat(info).st_mtime_ns
    assert shapes.prepare_shapes(data_dir, SPEC) == name
    assert os.stat(info).st_mtime_ns == mtime
    with open(os.path.join(data_dir, "shapes_coco", name, "annotations", "instances_train.json")) as f:
        assert len(json.load(f)["images"]) == 12


def test_spec_names_differ():
    assert shapes.ShapesSpec().name == "shapes_128_2000_200_4_s0"
    assert shapes.ShapesSpec(seed=1).name != shapes.ShapesSpec().name
    assert shapes.ShapesSpec(max_size=40).name != shapes.ShapesSpec().name
