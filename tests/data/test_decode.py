"""Image decoding and corrupt-record substitution."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from segjax.data.decode import DecodedSource, decode_image


def _encode(array: np.ndarray, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _grey(i: int) -> np.ndarray:
    """(4, 4) uint8 image whose pixels all equal 10 * i, to identify record i."""
    return np.full((4, 4), 10 * i, np.uint8)


def test_decode_image_formats():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_encode(rgb)), rgb)
    np.testing.assert_array_equal(decode_image(_encode(rgb[..., 0])), rgb[..., :1])
    np.testing.assert_array_equal(decode_image(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(decode_image(rgb[..., 0]), rgb[..., :1])
    np.testing.assert_array_equal(decode_image(rgb.astype(np.int64)), rgb)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(decode_image(Image.fromarray(rgba)), rgb)
    np.testing.assert_array_equal(decode_image(rgba), rgb)
    jpeg = decode_image(_encode(rgb, "jpeg"))
    assert jpeg.shape == (5, 7, 3) and jpeg.dtype == np.uint8


@pytest.mark.parametrize("bad", [b"not an image", _encode(_grey(1))[:30], np.zeros((4, 4, 2), np.uint8),
                                 np.full((2, 2), 300.0), np.zeros((0, 4, 3), np.uint8)])
def test_decode_image_rejects(bad):
    with pytest.raises((ValueError, OSError)):
        decode_image(bad)


def test_corrupt_records_are_substituted_logged_and_counted(caplog):
    records = [{"image": _encode(_grey(i)), "label": i} for i in range(6)]
    records[2]["image"] = b"\x89PNG garbage"
    records[3]["image"] = records[3]["image"][:25]  # truncated PNG
    records[5]["image"] = b""
    src = DecodedSource(records)
    with caplog.at_level(logging.WARNING, logger="segjax.data.decode"):
        out = src[2]
    # 2 and 3 are bad, so the next decodable record, 4, stands in.
    assert int(out["label"]) == 4 and out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["image"], _grey(4)[..., None])
    assert src.num_corrupt == 2 and src.corrupt_indices == [2, 3]
    assert "Record 2" in caplog.text and "Record 3" in caplog.text
    # Deterministic, counted once per record, and wraps around the end.
    assert int(src[3]["label"]) == 4
    assert int(src[5]["label"]) == 0
    assert int(src[1]["label"]) == 1
    assert src.corrupt_indices == [2, 3, 5]


def test_all_corrupt_raises():
    with pytest.raises(RuntimeError, match="could not be decoded"):
        DecodedSource([{"image": b"x"}, {"image": b"y"}])[0]


def test_missing_image_key_is_an_error_not_a_corrupt_record():
    src = DecodedSource([{"img": _grey(0)}], image_key="image")
    with pytest.raises(KeyError):
        src[0]
    assert src.num_corrupt == 0


def test_record_without_label():
    out = DecodedSource([{"image": _grey(3)}])[0]
    assert set(out) == {"image"} and out["image"].shape == (4, 4, 1)
