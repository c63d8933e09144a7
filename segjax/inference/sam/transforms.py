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


class SamInputError(ValueError, AssertionError):
    """Bad predictor input. An AssertionError too, which the reference raises for the
    same cases (its checks are asserts)."""


# Point labels a user may give, as the official prompt encoder (`_embed_points`) reads
# them: 1 foreground, 0 background, -1 "not a point" (the padding token: no position,
# its own embedding). The encoder treats any other value as a bare position with no
# type embedding in the reference but as a box corner (2, 3) or nothing (others) here,
# so they are refused.
POINT_LABELS = (1, 0, -1)


def check_image(image) -> np.ndarray:
    """Validates an (H, W, 3) uint8 image; returns it as a numpy array.

    A `PIL.Image.Image` is converted first with `segjax.data.decode.decode_image`
    (16-bit images scaled to 8 bits, alpha dropped, greyscale repeated to RGB).
    """
    if isinstance(image, Image.Image):
        from segjax.data.decode import decode_image

        image = decode_image(image, rgb=True)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SamInputError(f"image must be (H, W, 3) HWC, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise SamInputError(f"image must be uint8 with values in [0, 255], got {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise SamInputError(f"image is empty: shape {image.shape}")
    return image


def numeric_array(value, what: str) -> np.ndarray:
    """`value` as a float64 array; SamInputError when it is not numbers."""
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise SamInputError(f"{what} is not a numeric array: {e}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise SamInputError(f"{what} must be numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise SamInputError(f"{what} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise SamInputError(f"{what} holds non-finite values (NaN or inf): {value!r}"[:300])
    return arr


def to_float32(value: np.ndarray, what: str) -> np.ndarray:
    """Scaled float64 prompt coordinates -> float32 (the reference's cast), refusing
    values that overflow it."""
    with np.errstate(over="ignore"):
        out = np.asarray(value).astype(np.float32)
    if not np.isfinite(out).all():
        raise SamInputError(f"{what} holds non-finite values after scaling (beyond float32's range)")
    return out


def check_points(coords, labels, what: str = "point") -> tuple[np.ndarray, np.ndarray]:
    """Validates one prompt's points: coords (N, 2) finite (x, y) pixels, labels (N,)
    each in POINT_LABELS. Returns (float64 (N, 2), int32 (N,)). Points may lie
    outside the image (the reference accepts them)."""
    c = numeric_array(coords, f"{what} coords")
    lab = numeric_array(labels, f"{what} labels")
    if c.ndim != 2 or c.shape[-1] != 2:
        raise SamInputError(f"{what} coords must be (N, 2) (x, y), got shape {c.shape}")
    if lab.ndim > 1 and lab.size == lab.shape[0]:
        lab = lab.reshape(-1)  # (N, 1) labels
    if lab.ndim != 1 or len(lab) != len(c):
        raise SamInputError(f"{what} coords {c.shape} need one label each (N,), got labels of shape {lab.shape}")
    bad = ~np.isin(lab, POINT_LABELS)
    if bad.any():
        raise SamInputError(f"{what} labels must be 1 (foreground), 0 (background) or -1 (not a point), "
                            f"got {sorted(set(lab[bad].tolist()))}")
    return c, lab.astype(np.int32)


def check_boxes(boxes, what: str = "boxes") -> np.ndarray:
    """Validates (P, 4) XYXY boxes: finite, x0 <= x1 and y0 <= y1. Returns float64 (P, 4).

    A zero-width or zero-height box (x0 == x1 or y0 == y1) is accepted, as the
    reference accepts it (its two corner tokens then share a coordinate); an inverted
    one is refused (the reference would silently embed it with swapped corner roles).
    """
    b = numeric_array(boxes, what)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise SamInputError(f"{what} must be (P, 4) XYXY, got shape {b.shape}")
    inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if inverted.any():
        raise SamInputError(f"{what} must be XYXY with x0 <= x1 and y0 <= y1, got {b[inverted][0].tolist()}")
    return b


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
        raise SamInputError(f"coordinates must be (..., 2) (x, y), got shape {coords.shape}")
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) XYXY in original pixels -> float64 (..., 4) in resized-input pixels."""
    boxes = np.asarray(boxes)
    if boxes.shape[-1:] != (4,):
        raise SamInputError(f"boxes must be (..., 4) XYXY, got shape {boxes.shape}")
    return scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)
