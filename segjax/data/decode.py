"""Record decoding that survives corrupt images.

`DecodedSource` wraps any random-access source of raw records (a tfds ArrayRecord
data source, a list of dicts) and returns `{image: (H, W, C) uint8, label: int32}`.
A record whose image cannot be decoded is logged once with its index, counted, and
replaced by the next decodable record, so one bad file neither stops a long run nor
changes batch shapes, and the replacement is the same on every host and rerun.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

_log = logging.getLogger(__name__)

# More bad records in a row than this means the dataset is wrong, not a few files.
MAX_CONSECUTIVE_CORRUPT = 100


# PIL modes of 16-bit samples (PNG, TIFF). Pillow reads 16-bit greyscale PNGs as "I;16"
# (older versions as "I"); 16-bit RGB(A) and grey+alpha PNGs it reduces to 8 bits itself
# by keeping the high byte, which is the scaling used here too.
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_uint8(pil: Image.Image) -> np.ndarray:
    """A PIL image of any common mode -> (H, W) greyscale or (H, W, 3) RGB uint8.

    The single place where segjax turns a decoded image into 8-bit pixels (the data
    pipeline, the COCO builder, the SAM CLI and predictor all go through it):
      L: as is; 1 (bilevel): 0 / 255; RGB: as is;
      16-bit greyscale (I;16, I;16B, ..., and I holding values 0..65535): the high
        byte, v >> 8 = floor(v / 256), the scaling Pillow itself applies when it opens
        16-bit RGB(A) PNGs as 8-bit RGB(A); so a 16-bit grey PNG and the same image
        as 16-bit RGB give the same pixels;
      LA / La / PA / RGBA / RGBa / P with or without transparency: the colour without
        the alpha (no compositing; a palette is looked up);
      CMYK, YCbCr, LAB, HSV, ...: Pillow's conversion to RGB.

    Raises:
      ValueError: float images (mode F) and 32-bit integer images with values outside
        0..65535 (no unambiguous 8-bit scaling), or a mode Pillow cannot convert.
    """
    mode = pil.mode
    if mode in ("L", "RGB"):
        return np.asarray(pil)
    if mode == "1":
        return np.asarray(pil.convert("L"))
    if mode in _MODES_16:
        values = np.asarray(pil)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{mode} image with values {values.min()}..{values.max()} is not 8 or 16 bit "
                             "per sample; convert it to 8-bit greyscale or RGB")
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if mode == "F":
        raise ValueError("32-bit float image (PIL mode F): no standard 8-bit scaling; convert it to "
                         "8-bit greyscale or RGB")
    if mode in ("LA", "La"):
        return np.asarray(pil.convert("LA"))[..., 0]
    try:
        # RGBA keeps a palette's transparency where RGB would warn; the alpha is dropped.
        return np.asarray(pil.convert("RGBA" if mode in ("P", "PA", "RGBA", "RGBa") else "RGB"))[..., :3]
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def decode_image(value: Any, rgb: bool = False) -> np.ndarray:
    """Decodes an encoded, PIL or array image to (H, W, C) uint8 with C in {1, 3}.

    Args:
      value: bytes (PNG, JPEG, ... as PIL reads them), a `PIL.Image.Image` (see
        `pil_to_uint8` for how every mode, 16-bit ones included, becomes 8 bits), or
        an array (H, W) / (H, W, C) with C in {1, 3, 4} (uint8, or any dtype whose
        values are already 0..255).
      rgb: always return 3 channels (greyscale repeated), e.g. for SAM.

    Returns:
      (H, W, 1) for greyscale (unless `rgb`), else (H, W, 3) uint8; alpha is dropped.

    Raises:
      ValueError (or PIL's OSError) when `value` is not a readable image.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = Image.open(io.BytesIO(value))
        value.load()  # PIL decodes lazily; force it so corruption fails here.
    if isinstance(value, Image.Image):
        value = pil_to_uint8(value)
    image = np.asarray(value)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"not an (H, W, C) image with C in (1, 3, 4): shape {image.shape}")
    if image.dtype != np.uint8:
        if (not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all()
                or image.min() < 0 or image.max() > 255):
            raise ValueError(f"image of dtype {image.dtype} is not in 0..255")
        image = image.astype(np.uint8)
    image = image[:, :, :3]
    if rgb and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def read_image(path: str | os.PathLike, rgb: bool = True) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (`decode_image` of its bytes)."""
    with open(path, "rb") as f:
        return decode_image(f.read(), rgb=rgb)


class DecodedSource:
    """Random-access source of decoded records with corrupt-record substitution.

    `source[i]` decodes raw record i; if that fails it tries i+1, i+2, ... (mod N)
    and returns the first record that decodes (giving up after
    `MAX_CONSECUTIVE_CORRUPT` in a row). Reading is thread-safe.

    Attributes:
      num_corrupt: number of distinct raw indices that failed to decode so far.
      corrupt_indices: those indices, sorted.
    """

    def __init__(self, source: Sequence[dict], image_key: str = "image", label_key: str = "label"):
        """source: records, each a dict with `image_key` and optionally `label_key`."""
        if len(source) == 0:
            raise ValueError("source is empty")
        self._source = source
        self._image_key = image_key
        self._label_key = label_key
        self._corrupt: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._source)

    @property
    def num_corrupt(self) -> int:
        with self._lock:
            return len(self._corrupt)

    @property
    def corrupt_indices(self) -> list[int]:
        with self._lock:
            return sorted(self._corrupt)

    def _note(self, bucket: set[int], j: int, why: str) -> None:
        """Counts raw index j in `bucket` and logs the first time it is substituted."""
        with self._lock:
            first = j not in bucket
            bucket.add(j)
        if first:
            _log.warning("Record %d %s; substituting the next one.", j, why)

    def _load(self, j: int, record: dict) -> dict | None:
        """Raw record j -> output, or None (after `_note`) when it must be substituted."""
        encoded = record[self._image_key]  # a missing key is a broken setup, not a bad file: it propagates
        try:
            image = decode_image(encoded)
        except Exception as e:  # noqa: BLE001 - image decoders raise all sorts on bad bytes.
            self._note(self._corrupt, j, f"failed to decode ({type(e).__name__}: {e})")
            return None
        out = {"image": image}
        if self._label_key in record:
            out["label"] = np.asarray(record[self._label_key], np.int32)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Record `index` (or its substitute) as {image: (H, W, C) uint8, label: () int32 if present}."""
        n = len(self._source)
        index = int(index) % n
        tries = min(n, MAX_CONSECUTIVE_CORRUPT)
        for offset in range(tries):
            j = (index + offset) % n
            # Reading and key errors propagate: they are not one bad file but a broken setup.
            out = self._load(j, self._source[j])
            if out is not None:
                return out
        raise RuntimeError(f"records {index}..{index + tries - 1} (mod {n}) could not be decoded or used: "
                           "the data or its format is wrong")
