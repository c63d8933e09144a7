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


# ----------------------------------------------------------------------------- bit depths and modes
# 16-bit samples become 8 bits as v >> 8 (the high byte), the scaling Pillow applies
# itself when it opens 16-bit RGB(A) PNGs; before, greyscale ones were clipped to 255.

_RNG16 = np.random.default_rng(16)
_V16 = _RNG16.integers(0, 65536, (6, 5, 4), dtype=np.uint16)
_V16[0, 0] = [0, 255, 256, 65535]  # the byte boundaries
_V16[0, 1] = [32768, 32767, 257, 65280]


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey16", "grey_alpha16", "rgb16", "rgba16"])
def test_16_bit_pngs_are_scaled_not_clipped(channels):
    from segjax.testing.png import png_bytes

    v = _V16[..., :channels]
    out = decode_image(png_bytes(v), rgb=True)
    colour = v[..., :1].repeat(3, -1) if channels <= 2 else v[..., :3]  # alpha dropped
    np.testing.assert_array_equal(out, (colour >> 8).astype(np.uint8))
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    if channels == 1:
        np.testing.assert_array_equal(decode_image(png_bytes(v)), (v >> 8).astype(np.uint8))  # (H, W, 1)
    if channels == 3:  # Pillow's own 16 -> 8 bit reduction of colour PNGs is the same
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(v)))), out)


def test_16_bit_grey_and_rgb_of_one_image_agree():
    from segjax.testing.png import png_bytes

    grey = _V16[..., 0]
    a = decode_image(png_bytes(grey), rgb=True)
    b = decode_image(png_bytes(np.repeat(grey[..., None], 3, -1)))
    np.testing.assert_array_equal(a, b)
    mid = decode_image(png_bytes(np.full((2, 2), 32768)))
    assert (mid == 128).all()  # mid-grey, not white


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_pil_modes(mode):
    v = _V16[..., 0]
    if mode == "I":
        pil = Image.fromarray(v.astype(np.int32))
        assert pil.mode == "I"
    else:
        pil = Image.frombytes(mode, v.shape[::-1], v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    np.testing.assert_array_equal(decode_image(pil)[..., 0], (v >> 8).astype(np.uint8))
    if mode not in ("I;16", "I;16B"):
        return  # Pillow writes only these two as (16-bit greyscale) PNG
    buffer = io.BytesIO()
    pil.save(buffer, format="png")
    np.testing.assert_array_equal(decode_image(buffer.getvalue())[..., 0], (v >> 8).astype(np.uint8))


def test_other_pil_modes():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    bits = grey > 127
    np.testing.assert_array_equal(decode_image(Image.fromarray(bits))[..., 0], bits * np.uint8(255))
    la = Image.fromarray(np.stack([grey, 255 - grey], -1), mode="LA")
    np.testing.assert_array_equal(decode_image(la), grey[..., None])
    cmyk = Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_array_equal(decode_image(cmyk), np.asarray(cmyk.convert("RGB")))
    ycc = Image.fromarray(rgb).convert("YCbCr")
    assert decode_image(ycc).shape == (4, 6, 3)
    # a palette with a transparent entry: the palette colours, alpha dropped, no warning
    pal = Image.fromarray((grey % 4).astype(np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    pal.info["transparency"] = 0
    buffer = io.BytesIO()
    pal.save(buffer, format="png")
    lut = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(decode_image(buffer.getvalue()), lut[grey % 4])
    np.testing.assert_array_equal(decode_image(grey, rgb=True), np.repeat(grey[..., None], 3, -1))


@pytest.mark.parametrize("pil", [
    Image.fromarray(np.full((3, 3), 0.5, np.float32)),  # mode F
    Image.fromarray(np.array([[0, 70000]], np.int32)),  # mode I beyond 16 bits
    Image.fromarray(np.array([[-1, 10]], np.int32)),
], ids=["float", "int32_over_16_bit", "int32_negative"])
def test_unscalable_modes_are_refused(pil):
    with pytest.raises(ValueError, match="convert it to 8-bit"):
        decode_image(pil)


@pytest.mark.parametrize("bad", [np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]])])
def test_non_finite_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="0..255"):
        decode_image(bad)


def test_read_image(tmp_path):
    from segjax.data.decode import read_image
    from segjax.testing.png import png_bytes

    (tmp_path / "a.png").write_bytes(png_bytes(_V16[..., :3]))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), (_V16[..., :3] >> 8).astype(np.uint8))
    with pytest.raises(OSError):
        read_image(tmp_path / "missing.png")
