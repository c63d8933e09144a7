"""PNG files of any bit depth and colour type, written with numpy + zlib.

Pillow cannot write 16-bit RGB(A) or grey+alpha PNGs (it has no such modes), so the
tests of 16-bit decoding build them here, byte for byte per the PNG specification
(one IDAT chunk, filter type 0 on every row, no interlace).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# channels -> PNG colour type: grey, grey + alpha, RGB, RGBA
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(image: np.ndarray, bit_depth: int = 16) -> bytes:
    """(H, W) or (H, W, C) C in {1, 2, 3, 4} integer samples -> PNG file bytes.

    bit_depth 16 (values 0..65535, stored big-endian) or 8 (0..255).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    h, w, c = image.shape
    if bit_depth not in (8, 16) or c not in _COLOUR_TYPE:
        raise ValueError(f"bit_depth {bit_depth} with {c} channels is not supported")
    if image.min() < 0 or image.max() >= 2 ** bit_depth:
        raise ValueError(f"values {image.min()}..{image.max()} do not fit {bit_depth} bits")
    samples = image.astype(">u2" if bit_depth == 16 else np.uint8)
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, bit_depth, _COLOUR_TYPE[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))
