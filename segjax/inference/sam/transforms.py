"""SAM's "resize the longest side" preprocessing of images and prompts (numpy, PIL).

Legend: H/W original image size, h/w resized size, S the model's input size
(`img_size`, 1024 for the released models), N points.

Matches `segment_anything.utils.transforms.ResizeLongestSide`: the image is resized
with PIL's bilinear filter on uint8 (torchvision's `resize` of a PIL image, which is
what `apply_image` calls), and prompts are scaled by new/old per axis in float64.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(h, w) with max(h, w) == long_side, rounded half up as the reference does."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validates an (H, W, 3) uint8 image; returns it as a numpy array."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) HWC, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 with values in [0, 255], got {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with the longest side `long_side`.

    PIL bilinear (PIL always antialiases when downscaling); an image already at the
    target size is returned unchanged, as torchvision's `resize` does.
    """
    image = check_image(image)
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    return np.asarray(pil.resize((w, h), Image.BILINEAR))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) (x, y) in original pixels -> float64 (..., 2) in resized-input pixels."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64, copy=True)
    if coords.shape[-1:] != (2,):
        raise ValueError(f"coordinates must be (..., 2) (x, y), got shape {coords.shape}")
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) XYXY in original pixels -> float64 (..., 4) in resized-input pixels."""
    boxes = np.asarray(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be (..., 4) XYXY, got shape {boxes.shape}")
    return scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)
