"""COCO box and mask AP through pycocotools (or faster-coco-eval), and the results JSON.

Legend: N detections of one image, h/w its original size, m mask-head resolution.

`CocoEvaluator` collects detections image by image (boxes XYXY in original pixels,
contiguous labels mapped back to the dataset's category ids, masks thresholded and
RLE-encoded), writes them in the COCO results format (one JSON with `bbox` and
`segmentation` per detection, as detectron2 writes it) and returns the 12 standard
COCOeval numbers per IoU type, named as `METRIC_NAMES`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from segjax.ops.resample import linear_matrix

_log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _coco_classes(backend: str):
    """(COCO, COCOeval) classes of the backend."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def load_ground_truth(gt: Mapping | str | os.PathLike, backend: str = "pycocotools"):
    """A COCO instances dict or JSON path -> the backend's COCO object (stdout quiet)."""
    coco_cls, _ = _coco_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, (str, os.PathLike)):
            return coco_cls(os.fspath(gt))
        dataset = json.loads(json.dumps(gt))  # a private deep copy of plain JSON types
        if backend == "faster_coco_eval":
            return coco_cls(dataset)
        coco = coco_cls()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, h, w) bool/uint8 -> compressed RLE dicts with str counts (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()} for r in rles]


def to_coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray,
                    masks: np.ndarray | None = None) -> list[dict]:
    """One image's detections in the COCO results format.

    Args:
      image_id: the dataset's image id.
      boxes: (N, 4) XYXY in original pixels.
      scores: (N,); category_ids: (N,) the dataset's category ids.
      masks: (N, h, w) bool/uint8 binary masks in the original frame, or None.

    Returns:
      [{image_id, category_id, bbox: [x, y, w, h], score, segmentation?: RLE}].
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rles = encode_masks(masks) if masks is not None else [None] * len(boxes)
    out = []
    for box, score, cat, rle in zip(boxes, np.asarray(scores), np.asarray(category_ids), rles):
        x1, y1, x2, y2 = (float(v) for v in box)
        det = {"image_id": int(image_id), "category_id": int(cat), "bbox": [x1, y1, x2 - x1, y2 - y1],
               "score": float(score)}
        if rle is not None:
            det["segmentation"] = rle
        out.append(det)
    return out


def coco_eval(gt, results: Sequence[dict], iou_type: str, image_ids: Sequence[int] | None = None,
              backend: str = "pycocotools") -> tuple[np.ndarray, str]:
    """Runs COCOeval.

    Args:
      gt: the backend's COCO object (see `load_ground_truth`).
      results: COCO results dicts; for 'segm' each needs `segmentation` (any `bbox`
        is dropped, else loadRes would evaluate the box as the mask).
      iou_type: 'bbox' or 'segm'.
      image_ids: restrict to these images (default: every ground-truth image).

    Returns:
      (12,) float64 stats in METRIC_NAMES order (-1 where COCOeval has no ground
      truth, 0 everywhere when there are no detections), and the printed summary.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _, eval_cls = _coco_classes(backend)
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        if any("segmentation" not in r for r in results):
            raise ValueError("segm evaluation needs 'segmentation' in every result")
    if not results:
        return np.zeros(len(METRIC_NAMES)), "no detections"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        dt = gt.loadRes(json.loads(json.dumps(list(results))))
        evaluator = eval_cls(gt, dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[: len(METRIC_NAMES)], np.float64), buffer.getvalue()


class CocoEvaluator:
    """Accumulates one split's detections, writes the results JSON, returns COCO AP.

    Usage::

        ev = CocoEvaluator(coco.ground_truth(records, metadata), metadata["category_ids"])
        for each image: ev.add(image_id, boxes, scores, labels, masks)
        metrics = ev.evaluate(results_path)  # {'bbox/AP': ..., 'segm/AP50': ..., ...}
    """

    def __init__(self, ground_truth: Mapping | str | os.PathLike | None,
                 category_ids: Sequence[int] | None = None, iou_types: Sequence[str] = IOU_TYPES,
                 backend: str = "pycocotools"):
        """Args:
          ground_truth: COCO instances dict or JSON path; None for an evaluator that
            only collects (and writes) results, e.g. on a process other than 0.
          category_ids: category id of contiguous label k at index k - 1 (labels
            1..K); None when labels already are the dataset's category ids.
          iou_types: subset of ('bbox', 'segm').
          backend: 'pycocotools' or 'faster_coco_eval'.
        """
        bad = set(iou_types) - set(IOU_TYPES)
        if bad:
            raise ValueError(f"unknown iou types {sorted(bad)}; choose from {IOU_TYPES}")
        self.gt = None if ground_truth is None else load_ground_truth(ground_truth, backend)
        self.category_ids = None if category_ids is None else np.asarray(category_ids, np.int64)
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.summaries: dict[str, str] = {}

    def add(self, image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
            masks: np.ndarray | None = None, mask_threshold: float = 0.5) -> None:
        """Adds one image's detections (N may be 0; the image still counts).

        Args:
          boxes: (N, 4) XYXY original pixels; scores: (N,); labels: (N,) contiguous.
          masks: (N, h, w) probabilities or binary masks in the original frame
            (thresholded at `mask_threshold`, torchvision's COCO evaluation uses 0.5).
        """
        labels = np.asarray(labels, np.int64)
        if self.category_ids is not None:
            if labels.size and (labels.min() < 1 or labels.max() > len(self.category_ids)):
                raise ValueError(f"labels must be in 1..{len(self.category_ids)}, got {labels}")
            cats = self.category_ids[labels - 1] if labels.size else labels
        else:
            cats = labels
        binary = None
        if masks is not None and "segm" in self.iou_types:
            masks = np.asarray(masks)
            binary = masks > mask_threshold if masks.dtype != np.bool_ else masks
        self.image_ids.append(int(image_id))
        self.results.extend(to_coco_results(image_id, boxes, scores, cats, binary))

    def extend(self, results: Sequence[dict], image_ids: Sequence[int]) -> None:
        """Adds already-converted results (e.g. another process's `write` output)."""
        self.results.extend(results)
        self.image_ids.extend(int(i) for i in image_ids)

    def write(self, path: str) -> str:
        """Writes the results JSON (COCO results format) and returns its path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.results, f)
        return path

    def evaluate(self, results_path: str | None = None) -> dict[str, float]:
        """COCO metrics over the images added so far: {'bbox/AP', ..., 'segm/ARl'}.

        Writes the results JSON to `results_path` first when given.
        """
        if self.gt is None:
            raise ValueError("this CocoEvaluator was built without ground truth")
        if results_path:
            self.write(results_path)
        metrics = {}
        for iou_type in self.iou_types:
            stats, summary = coco_eval(self.gt, self.results, iou_type, self.image_ids, self.backend)
            self.summaries[iou_type] = summary
            _log.info("COCO %s (%s, %d images):\n%s", iou_type, self.backend, len(self.image_ids), summary)
            metrics.update({f"{iou_type}/{n}": float(v) for n, v in zip(METRIC_NAMES, stats)})
        return metrics


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, padding: int = 1) -> np.ndarray:
    """Pastes mask-head probabilities into the image, as torchvision's
    `paste_masks_in_image` (host numpy, any image size).

    Each (m, m) mask is zero-padded by `padding`, its box scaled by (m + 2p) / m about
    its centre and truncated to integers, the mask resized bilinearly to the box's
    (y2 - y1 + 1, x2 - x1 + 1) pixels and written where it overlaps the image.

    Args:
      masks: (N, m, m) probabilities; boxes: (N, 4) XYXY in the target frame.
      height, width: the target image size.

    Returns:
      (N, height, width) float32.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n, m = masks.shape[0], masks.shape[-1]
    out = np.zeros((n, height, width), np.float32)
    if n == 0:
        return out
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    scale = np.float32((m + 2 * padding) / m)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    cy = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1).astype(np.int64)
    for i, (x0, y0, x1, y1) in enumerate(expanded):
        w, h = max(int(x1 - x0 + 1), 1), max(int(y1 - y0 + 1), 1)
        resized = linear_matrix(m + 2 * padding, h) @ padded[i] @ linear_matrix(m + 2 * padding, w).T
        ix0, ix1 = max(x0, 0), min(x1 + 1, width)
        iy0, iy1 = max(y0, 0), min(y1 + 1, height)
        if ix1 > ix0 and iy1 > iy0:
            out[i, iy0:iy1, ix0:ix1] = resized[iy0 - y0: iy1 - y0, ix0 - x0: ix1 - x0]
    return out
