"""Run-length encoding of binary masks in the COCO layout (pure numpy).

An uncompressed RLE is {"size": [H, W], "counts": [n0, n1, ...]}: alternating runs of
0s and 1s over the mask flattened in column-major (Fortran) order, starting with a
run of 0s (possibly of length 0). `coco_encode_rle` compresses it with pycocotools.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def masks_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """(M, H, W) bool -> M uncompressed RLEs (`segment_anything`'s mask_to_rle_pytorch)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    m, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(m, h * w)  # column-major per mask
    out = []
    for row in flat:
        change = np.flatnonzero(row[1:] != row[:-1]) + 1
        bounds = np.concatenate([[0], change, [h * w]])
        counts = [] if not row[0] else [0]
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h}*{w}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of set pixels."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed -> COCO compressed RLE with a str `counts` (JSON-ready). Needs pycocotools."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("output_mode='coco_rle' needs pycocotools (pip install pycocotools)") from e
    h, w = rle["size"]
    out = mask_utils.frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out
