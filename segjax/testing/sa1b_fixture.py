"""A small SA-1B-format folder written by the tests: shapes images, their masks as RLE, bad cases.

Good images sa_1 .. sa_<n> are `segjax.data.shapes` images (known objects) saved as
JPEG, with one annotation per visible object (compressed RLE from pycocotools, XYWH
bbox, area, predicted_iou, stability_score, crop_box, point_coords as SA-1B has them).
With `bad=True` the folder also holds one file of every bad case the builder handles.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data import shapes

# What the build must report for write_sa1b(root, n, bad=True).
BAD_COUNTS = {"bad_json": 2, "bad_image_records": 1, "duplicate_images": 1, "missing_images": 1,
              "corrupt_images": 1, "size_mismatch_images": 1, "bad_annotation_records": 1,
              "bad_segmentation": 2}


def annotation(mask: np.ndarray, ann_id: int) -> dict:
    """An SA-1B annotation of an (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x1, y1 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode()},
            "bbox": [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1], "area": int(mask.sum()),
            "predicted_iou": 0.9, "stability_score": 0.95, "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
            "point_coords": [[float(xs.mean()), float(ys.mean())]]}


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


def _write(root: str, stem: str, image: bytes | None, data) -> None:
    if image is not None:
        with open(os.path.join(root, f"{stem}.jpg"), "wb") as f:
            f.write(image)
    with open(os.path.join(root, f"{stem}.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def write_sa1b(root: str, n: int = 4, bad: bool = False, spec: shapes.ShapesSpec | None = None) -> dict:
    """Writes root/sa_<i>.{jpg,json}; returns {image_id: [(H, W) bool masks]} of the good images."""
    spec = spec or shapes.ShapesSpec(image_size=64, num_train=n, num_val=0, min_size=12, max_size=30)
    os.makedirs(root, exist_ok=True)
    truth = {}
    ann_id = 1
    for i in range(1, n + 1):
        image, objects = shapes.generate_image(spec, "train", i)
        h, w = image.shape[:2]
        anns = []
        for o in objects:
            anns.append(annotation(o["mask"], ann_id))
            ann_id += 1
        truth[i] = [o["mask"] for o in objects]
        _write(root, f"sa_{i}", _jpeg(image), {"image": {"image_id": i, "width": w, "height": h,
                                                          "file_name": f"sa_{i}.jpg"}, "annotations": anns})
    if not bad:
        return truth
    image, objects = shapes.generate_image(spec, "train", 0)
    h, w = image.shape[:2]
    good = annotation(objects[0]["mask"], 9000)
    info = lambda k: {"image_id": k, "width": w, "height": h, "file_name": f"sa_{k}.jpg"}  # noqa: E731
    _write(root, "sa_100", _jpeg(image), "{not json")                                      # bad_json
    _write(root, "sa_101", _jpeg(image), [1, 2])                                           # bad_json
    _write(root, "sa_102", _jpeg(image), {"image": {"image_id": "x", "width": w, "height": h}})  # bad record
    _write(root, "sa_103", _jpeg(image), {"image": info(1), "annotations": []})             # duplicate id 1
    _write(root, "sa_104", None, {"image": info(104), "annotations": [good]})               # missing image
    _write(root, "sa_105", b"\xff\xd8 not a jpeg" + bytes(50), {"image": info(105), "annotations": [good]})
    _write(root, "sa_106", _jpeg(image[:, : w // 2]), {"image": info(106), "annotations": [good]})  # size
    wrong_size = dict(good, id=9001, segmentation={"size": [h + 1, w], "counts": good["segmentation"]["counts"]})
    garbage = dict(good, id=9002, segmentation={"size": [h, w], "counts": "!!!!"})
    _write(root, "sa_107", _jpeg(image), {"image": info(107), "annotations": [
        good, wrong_size, garbage, "not an annotation"]})                                   # 1 kept, 3 bad
    _write(root, "sa_108", _jpeg(image), {"image": info(108), "annotations": []})           # no masks
    return truth
