"""COCO evaluator: perfect/noisy detections, equality with plain pycocotools (and
faster-coco-eval), results JSON, mask pasting equal to torchvision."""

import json
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segjax.data import shapes
from segjax.evaluators import coco as coco_eval
from segjax.testing import importorskip

torch.set_num_threads(1)

SPEC = shapes.ShapesSpec(image_size=64, num_train=1, num_val=12, max_objects=4, min_size=10, max_size=28)


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_coco"))
    return shapes.write_shapes_coco(root, SPEC)["val"][1]


def _detections(gt: COCO, noise: float, seed: int = 0):
    """Per image: (image_id, boxes XYXY, scores, labels, masks) from the ground truth,
    jittered by `noise` pixels, plus one false positive per image."""
    rng = np.random.default_rng(seed)
    out = []
    for image_id in sorted(gt.getImgIds()):
        info = gt.imgs[image_id]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        boxes, labels, masks = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            boxes.append(np.array([x, y, x + w, y + h]) + rng.normal(0, noise, 4))
            labels.append(a["category_id"])
            m = gt.annToMask(a)
            masks.append(np.roll(m, int(round(rng.normal(0, noise))), axis=1) if noise else m)
        boxes.append(np.array([0, 0, 12, 12.0]))
        labels.append(1)
        masks.append(np.zeros((info["height"], info["width"]), np.uint8))
        scores = rng.uniform(0.3, 1.0, len(boxes)) if noise else np.r_[np.ones(len(anns)), 0.1]
        out.append((image_id, np.array(boxes), scores, np.array(labels), np.array(masks, np.uint8)))
    return out


def test_perfect_detections_score_one(gt_file, tmp_path):
    gt = COCO(gt_file)
    ev = coco_eval.CocoEvaluator(gt_file, category_ids=[1, 2, 3])
    for image_id, boxes, scores, labels, masks in _detections(gt, noise=0):
        ev.add(image_id, boxes, scores, labels, masks.astype(np.float32))
    metrics = ev.evaluate(str(tmp_path / "dets.json"))
    assert set(metrics) == {f"{t}/{n}" for t in ("bbox", "segm") for n in coco_eval.METRIC_NAMES}
    for t in ("bbox", "segm"):
        assert metrics[f"{t}/AP"] == pytest.approx(1.0) and metrics[f"{t}/AP50"] == pytest.approx(1.0)
    with open(tmp_path / "dets.json") as f:
        written = json.load(f)
    assert len(written) == len(ev.results) and {"bbox", "segmentation", "score"} <= set(written[0])
    assert isinstance(written[0]["segmentation"]["counts"], str)


def _plain_pycocotools(gt_file, dets_file, iou_type):
    gt = COCO(gt_file)
    results = json.load(open(dets_file))
    if iou_type == "segm":
        for r in results:
            r.pop("bbox")
    e = COCOeval(gt, gt.loadRes(results), iou_type)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return np.array(e.stats)


def test_noisy_detections_equal_plain_pycocotools(gt_file, tmp_path):
    gt = COCO(gt_file)
    ev = coco_eval.CocoEvaluator(coco_eval.load_ground_truth(gt_file).dataset, category_ids=[1, 2, 3])
    for det in _detections(gt, noise=2.0):
        ev.add(*det)
    path = str(tmp_path / "noisy.json")
    metrics = ev.evaluate(path)
    for t in ("bbox", "segm"):
        ref = _plain_pycocotools(gt_file, path, t)
        got = np.array([metrics[f"{t}/{n}"] for n in coco_eval.METRIC_NAMES])
        np.testing.assert_array_equal(got, ref)
        assert 0.05 < metrics[f"{t}/AP"] < 0.95  # noisy: neither perfect nor zero


def test_faster_coco_eval_agrees(gt_file):
    importorskip("faster_coco_eval")
    gt = COCO(gt_file)
    dets = _detections(gt, noise=2.0, seed=1)
    metrics = {}
    for backend in coco_eval.BACKENDS:
        ev = coco_eval.CocoEvaluator(gt_file, category_ids=[1, 2, 3], backend=backend)
        for det in dets:
            ev.add(*det)
        metrics[backend] = ev.evaluate()
    for k, v in metrics["pycocotools"].items():
        assert metrics["faster_coco_eval"][k] == pytest.approx(v, abs=1e-12), k


def test_subset_of_images_and_no_detections(gt_file):
    gt = COCO(gt_file)
    dets = _detections(gt, noise=0)
    ev = coco_eval.CocoEvaluator(gt_file, category_ids=[1, 2, 3], iou_types=("bbox",))
    for det in dets[:3]:
        ev.add(*det)
    assert ev.evaluate()["bbox/AP"] == pytest.approx(1.0)  # only the added images count
    empty = coco_eval.CocoEvaluator(gt_file, category_ids=[1, 2, 3])
    empty.add(dets[0][0], np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 64, 64)))
    assert all(v == 0 for v in empty.evaluate().values())


def test_label_mapping_and_bad_labels(gt_file):
    ev = coco_eval.CocoEvaluator(gt_file, category_ids=[5, 9, 13], iou_types=("bbox",))
    ev.add(1, np.array([[0, 0, 4, 4.0], [1, 1, 5, 6.0]]), np.array([0.9, 0.8]), np.array([3, 1]))
    assert [r["category_id"] for r in ev.results] == [13, 5]
    assert ev.results[1]["bbox"] == [1.0, 1.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        ev.add(1, np.zeros((1, 4)), np.ones(1), np.array([0]))
    with pytest.raises(ValueError, match="unknown iou types"):
        coco_eval.CocoEvaluator(gt_file, iou_types=("keypoints",))


@pytest.mark.parametrize("m", [28, 7])
def test_paste_masks_equals_torchvision(m):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(m)
    masks = rng.random((6, m, m)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 30.1, 20.9], [-5, -3, 12, 40], [50, 30, 90, 70], [10, 10, 10.4, 11],
                      [0, 0, 63, 47], [20.5, 5.5, 40.25, 45.75]], np.float32)
    ours = coco_eval.paste_masks(masks, boxes, 48, 64)
    ref = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (48, 64))[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert coco_eval.paste_masks(np.zeros((0, m, m)), np.zeros((0, 4)), 5, 6).shape == (0, 5, 6)


def test_encode_masks_roundtrip():
    from pycocotools import mask as mask_utils

    masks = np.random.default_rng(0).random((3, 9, 7)) > 0.5
    rles = coco_eval.encode_masks(masks)
    for m, r in zip(masks, rles):
        assert r["size"] == [9, 7]
        np.testing.assert_array_equal(mask_utils.decode({**r, "counts": r["counts"].encode()}), m)
    assert os.path.basename(__file__).startswith("test_")
