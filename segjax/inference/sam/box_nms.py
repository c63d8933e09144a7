"""Greedy box non-maximum suppression on the host (numpy), torchvision semantics.

Legend: N boxes, XYXY float. For variable-size host work (the automatic mask
generator's per-crop and cross-crop de-duplication); jitted, fixed-size NMS lives in
`segjax.ops.nms`.

Matches `torchvision.ops.nms` / `batched_nms` on CPU: boxes sorted by score,
descending, ties in index order (torch's CPU sort is stable); areas, intersections
and IoU in float32 as the kernel computes them; a box is dropped when its IoU with a
kept box is strictly greater than the threshold; kept indices come back in that
order (decreasing score). One difference: for more than 1000 boxes, torchvision's
`batched_nms` re-sorts the kept boxes with an unstable sort, so boxes with exactly
tied scores may come back in another order there (the kept set is the same).
"""

from __future__ import annotations

import numpy as np


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """boxes (N, 4), scores (N,) -> kept indices (K,) int64, by decreasing score."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (N, 4) and scores (N,), got {boxes.shape} and {scores.shape}")
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(n, bool)
    keep = []
    zero = np.float32(0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = order[pos + 1:]
            rest = rest[~suppressed[rest]]
            if len(rest) == 0:
                break
            w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            # the kernel compares the float IoU with the double threshold
            suppressed[rest[iou.astype(np.float64) > float(iou_threshold)]] = True
    return np.asarray(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each category `idxs` (N,); kept indices (K,) int64 by decreasing score."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    idxs = np.asarray(idxs)
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    keep = np.zeros(len(boxes), bool)
    for c in np.unique(idxs):
        members = np.flatnonzero(idxs == c)
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = np.flatnonzero(keep)
    return kept[np.argsort(-scores[kept], kind="stable")].astype(np.int64)
