"""Crop boxes and point grids of SAM's automatic mask generator (pure numpy).

Legend: N points, M masks, (H, W) original image size, (h, w) crop size. Boxes are
XYXY integer pixels; a crop box [x0, y0, x1, y1] covers image[y0:y1, x0:x1].
Semantics follow `segment_anything.utils.amg`.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float64 (x, y) cell centres of an n x n grid over [0, 1]^2, x fastest."""
    if n_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side, indexing="xy")  # (n, n) each; rows are y
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has int(n / scale**i) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """The whole image, then (2**(i+1))**2 overlapping crops for layer i+1.

    Returns (crop_boxes, layer_idxs): XYXY int boxes and the layer of each. Crops of a
    layer are listed x-major (all y0 for the first x0, then the next x0), as the reference.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_side))
        crop_w = crop_len(im_w, n_side, overlap)
        crop_h = crop_len(im_h, n_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def uncrop_boxes(boxes: np.ndarray, crop_box) -> np.ndarray:
    """(..., 4) XYXY in the crop frame -> image frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + np.asarray([x0, y0, x0, y0], dtype=np.asarray(boxes).dtype)


def uncrop_points(points: np.ndarray, crop_box) -> np.ndarray:
    """(..., 2) (x, y) in the crop frame -> image frame."""
    return points + np.asarray([crop_box[0], crop_box[1]], dtype=np.asarray(points).dtype)


def uncrop_masks(masks: np.ndarray, crop_box, orig_h: int, orig_w: int) -> np.ndarray:
    """(M, h, w) masks of a crop -> (M, H, W), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return np.pad(masks, ((0, 0), (y0, pad_y - y0), (x0, pad_x - x0)))


def is_box_near_crop_edge(boxes: np.ndarray, crop_box, orig_box, atol: float = 20.0) -> np.ndarray:
    """(M, 4) crop-frame boxes -> (M,) bool: a side within `atol` px of a crop edge that
    is not also an image edge (such masks are likely cut by the crop)."""
    boxes = uncrop_boxes(np.asarray(boxes), crop_box).astype(np.float32)
    crop = np.asarray(crop_box, np.float32)[None]
    orig = np.asarray(orig_box, np.float32)[None]
    atol = np.float32(atol)
    near_crop = np.abs(boxes - crop) <= atol
    near_image = np.abs(boxes - orig) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    """(..., 4) XYXY -> XYWH (same dtype)."""
    box = np.array(box, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def mask_to_box(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool -> (M, 4) int64 XYXY with inclusive max corner; zeros for an empty
    mask (`batched_mask_to_box`; `postprocess.mask_boxes` is the jnp twin)."""
    masks = np.asarray(masks, bool)
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)  # (M, H), (M, W)
    h, w = masks.shape[-2:]
    out = np.zeros((*masks.shape[:-2], 4), np.int64)
    nonempty = rows.any(axis=-1)
    out[nonempty, 0] = cols[nonempty].argmax(axis=-1)
    out[nonempty, 1] = rows[nonempty].argmax(axis=-1)
    out[nonempty, 2] = w - 1 - cols[nonempty][..., ::-1].argmax(axis=-1)
    out[nonempty, 3] = h - 1 - rows[nonempty][..., ::-1].argmax(axis=-1)
    return out
