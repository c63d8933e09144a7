"""Anchors as torchvision's `AnchorGenerator`: static numpy constants for static shapes.

Legend: A anchors per location, H/W feature size, N total anchors.

Base ("cell") anchors: for ratio r (= height / width) and size s,
h = sqrt(r) * s, w = s / sqrt(r), the box [-w, -h, w, h] / 2 rounded half-to-even,
computed in float32 exactly as torchvision does. Order: ratios outer, sizes inner.
Grid anchors: shifts (x * stride_w, y * stride_h) with stride = padded image size //
feature size (integer division), flattened (H, W, A) row-major, levels concatenated,
which is the order of the RPN head's `(B, H, W, A)` outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """(A, 4) float32 XYXY base anchors centred on 0, A = len(ratios) * len(sizes)."""
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base).astype(np.float32)  # torch.round: half to even, like np.round


def grid_anchors(feature_hw: Sequence[tuple[int, int]], image_hw: tuple[int, int],
                 sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
                 ratios: Sequence[float] = DEFAULT_RATIOS) -> np.ndarray:
    """All anchors of a padded batch.

    Args:
      feature_hw: (H_l, W_l) of each pyramid level, finest first.
      image_hw: the padded input size (H, W) (torchvision: `image_list.tensors` shape).
      sizes: anchor sizes per level; ratios: aspect ratios (shared by all levels).
    Returns:
      (N, 4) float32 XYXY, N = sum_l H_l * W_l * A_l.
    """
    if len(sizes) != len(feature_hw):
        raise ValueError(f"{len(sizes)} anchor size groups for {len(feature_hw)} feature levels")
    out = []
    for (gh, gw), level_sizes in zip(feature_hw, sizes):
        sh, sw = image_hw[0] // gh, image_hw[1] // gw
        base = cell_anchors(level_sizes, ratios)
        shift_x = (np.arange(gw, dtype=np.int32) * sw)
        shift_y = (np.arange(gh, dtype=np.int32) * sh)
        yy, xx = np.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = np.stack([xx, yy, xx, yy], axis=1).astype(np.float32)  # (H*W, 4)
        out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return np.concatenate(out, 0).astype(np.float32)


def num_anchors_per_level(feature_hw: Sequence[tuple[int, int]], num_per_location: int) -> list[int]:
    return [h * w * num_per_location for h, w in feature_hw]
