"""A tiny COCO-format dataset written by the tests, with every bad case the reader handles.

Images (ids): 1 RGB JPEG 40x60 with good and bad annotations; 2 greyscale PNG with no
annotations; 3 corrupt bytes; 4 missing file; 5 a PNG whose size disagrees with the
JSON; 6 a truncated JPEG; 7 a palette PNG with one polygon.
Categories 3 "cat", 7 "dog", 11 "emu" (non-contiguous ids -> labels 1, 2, 3).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "emu"}]
H, W = 40, 60

# What the build must report for this dataset.
EXPECTED_COUNTS = {
    "images_in_json": 7, "images_written": 3, "bad_image_records": 0, "missing_images": 1, "corrupt_images": 2,
    "size_mismatch_images": 1, "duplicate_images": 0, "images_without_annotations": 1,
    "annotations_in_json": 13, "annotations_written": 6, "annotations_of_skipped_images": 2,
    "crowd_annotations": 1, "degenerate_boxes": 1, "tiny_boxes": 1, "empty_masks": 0,
    "bad_annotation_records": 0, "bad_ids": 0,
    "bad_bbox": 1, "bad_segmentation": 1, "unknown_category": 1, "unknown_image": 1,
}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="png")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


def write_tiny_coco(root: str) -> tuple[str, str]:
    """Writes root/images/* and root/instances.json; returns (image_dir, json path)."""
    rng = np.random.default_rng(0)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    files = {
        "a.jpg": _jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
        "grey.png": _png(rng.integers(0, 256, (30, 20), dtype=np.uint8)),
        "corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(100),
        "wrong_size.png": _png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
        "truncated.jpg": _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300],
        "palette.png": _png(rng.integers(0, 4, (24, 32), dtype=np.uint8), mode="P"),
    }
    for name, data in files.items():
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(data)
    images = [
        {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "grey.png", "height": 30, "width": 20},
        {"id": 3, "file_name": "corrupt.jpg", "height": 10, "width": 10},
        {"id": 4, "file_name": "missing.jpg", "height": 10, "width": 10},
        {"id": 5, "file_name": "wrong_size.png", "height": 50, "width": 50},
        {"id": 6, "file_name": "truncated.jpg", "height": 64, "width": 64},
        {"id": 7, "file_name": "palette.png", "height": 24, "width": 32},
    ]
    crowd = np.zeros((H, W), np.uint8)
    crowd[5:15, 30:50] = 1
    runs = _runs(crowd.flatten(order="F"))  # uncompressed RLE
    compressed = np.zeros((H, W), np.uint8)
    compressed[20:35, 2:12] = 1
    rle = mask_utils.encode(np.asfortranarray(compressed))
    annotations = [
        # 1: polygon (a triangle) of "cat"
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10.0, 5.0, 20.0, 20.0], "area": 200.0,
         "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 10, 25]]},
        # 2: crowd as uncompressed RLE
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [30.0, 5.0, 20.0, 10.0], "area": 200.0,
         "iscrowd": 1, "segmentation": {"size": [H, W], "counts": runs}},
        # 3: compressed RLE (str counts), box running off the image: clamped to x2 = 60
        {"id": 12, "image_id": 1, "category_id": 11, "bbox": [2.0, 20.0, 70.0, 15.0],
         "iscrowd": 0, "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
        # 4: degenerate (zero width)
        {"id": 13, "image_id": 1, "category_id": 3, "bbox": [5.0, 5.0, 0.0, 10.0], "area": 0.0,
         "iscrowd": 0, "segmentation": [[5, 5, 5, 15, 5, 10]]},
        # 5: tiny (width 0.5): kept
        {"id": 14, "image_id": 1, "category_id": 7, "bbox": [40.0, 30.0, 0.5, 6.0], "area": 3.0,
         "iscrowd": 0, "segmentation": [[40, 30, 40.5, 30, 40.5, 36, 40, 36]]},
        # 6: malformed bbox
        {"id": 15, "image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 2, 4, 2, 4, 5]]},
        # 7: malformed segmentation (a 2-point "polygon", which pycocotools would read as a box)
        {"id": 16, "image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 3.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 2, 4, 5]]},
        # 8: unknown category
        {"id": 17, "image_id": 1, "category_id": 99, "bbox": [1.0, 2.0, 3.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 2, 4, 2, 4, 5]]},
        # 9: unknown image
        {"id": 18, "image_id": 42, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 2, 4, 2, 4, 5]]},
        # 10: on the corrupt image (its image is skipped)
        {"id": 19, "image_id": 3, "category_id": 3, "bbox": [1.0, 1.0, 3.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 1, 4, 1, 4, 4]]},
        # 11: a second polygon instance of "dog", two parts
        {"id": 20, "image_id": 1, "category_id": 7, "bbox": [45.0, 20.0, 14.0, 19.0], "area": 100.0,
         "iscrowd": 0, "segmentation": [[45, 20, 59, 20, 59, 28], [45, 30, 55, 30, 50, 39]]},
        # 12: palette image, one polygon
        {"id": 21, "image_id": 7, "category_id": 11, "bbox": [2.0, 2.0, 10.0, 10.0], "area": 50.0,
         "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 2, 12]]},
        # 13: on the missing image
        {"id": 22, "image_id": 4, "category_id": 3, "bbox": [1.0, 1.0, 3.0, 3.0], "iscrowd": 0,
         "segmentation": [[1, 1, 4, 1, 4, 4]]},
    ]
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return image_dir, ann_file


def _runs(flat: np.ndarray) -> list[int]:
    """Column-major flattened binary mask -> COCO uncompressed RLE counts (zeros first)."""
    runs, current, count = [], 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    return runs
