"""Removal of small islands and holes from a binary mask (numpy + scipy, no OpenCV).

`segment_anything.utils.amg.remove_small_regions` with the 8-connected components of
`cv2.connectedComponentsWithStats` replaced by `scipy.ndimage.label`; both number the
components in raster order of their first pixel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """(H, W) bool -> ((H, W) bool, changed).

    mode "holes": fills background components (8-connected) smaller than area_thresh;
    mode "islands": drops foreground components smaller than area_thresh, but keeps the
    largest one if all of them are small.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    correct_holes = mode == "holes"
    working = mask ^ correct_holes  # the components to examine are the set pixels here
    regions, n = ndimage.label(working, structure=_EIGHT)
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]  # label 0 is the rest
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        dropped = set(fill)
        fill = [i for i in range(n + 1) if i not in dropped]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
