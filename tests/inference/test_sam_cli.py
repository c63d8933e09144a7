"""`python -m segjax.inference.sam` on a tiny converted SAM: files written, masks
equal to the predictor's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("segment_anything")

from segjax.inference.sam.cli import main as sam_cli
from segjax.inference.sam.predictor import SamPredictor
from segjax.testing.images import chelsea
from segjax.testing.sam_official import TINY, converted


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam_cli")
    converted(d, TINY, seed=0)
    Image.fromarray(chelsea()).save(d / "cat.png")
    return d


def test_points_and_box(files, capsys):
    d = files
    out = d / "pts"
    assert sam_cli([str(d / "ckpt"), str(d / "cat.png"), "--points", "200,150", "300,100,0",
                    "--box", "50,40,400,280", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["masks"] == 1  # several prompts: single-mask output
    saved = np.load(out / "masks.npz")
    pred = SamPredictor.from_checkpoint(d / "ckpt")
    pred.set_image(np.asarray(Image.open(d / "cat.png").convert("RGB")))
    masks, _, _ = pred.predict(np.array([[200.0, 150.0], [300.0, 100.0]]), np.array([1, 0]),
                               np.array([50.0, 40.0, 400.0, 280.0]), multimask_output=False)
    np.testing.assert_array_equal(saved["masks"], masks)
    png = np.asarray(Image.open(out / "mask_0.png"))
    np.testing.assert_array_equal(png > 127, masks[0])
    assert Image.open(out / "overlay.png").size == (451, 300)


def test_one_point_multimask_and_everything(files, capsys):
    d = files
    assert sam_cli([str(d / "ckpt"), str(d / "cat.png"), "--points", "200,150", "--out", str(d / "one")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["masks"] == 3
    assert sorted(p.name for p in (d / "one").iterdir()) == ["mask_0.png", "mask_1.png", "mask_2.png",
                                                              "masks.npz", "overlay.png"]
    assert sam_cli([str(d / "ckpt"), str(d / "cat.png"), "--everything", "--points-per-side", "4",
                    "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--out", str(d / "all")]) == 0
    n = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["masks"]
    saved = np.load(d / "all" / "masks.npz")
    assert n > 0 and saved["masks"].shape == (n, 300, 451) and (np.diff(saved["areas"]) <= 0).all()
    with pytest.raises(SystemExit):
        sam_cli([str(d / "ckpt"), str(d / "cat.png"), "--out", str(d / "none")])


# Each gave NaN scores and empty masks with exit 0, a crash in the overlay drawing, a
# numpy reshape error or an argparse usage dump before; now one line and exit 2, and
# nothing is written.
BAD_ARGS = {
    "nan_point": ["--points", "nan,150"],
    "inf_point": ["--points", "200,inf"],
    "neg_inf_second_point": ["--points", "200,150", "3,-inf"],
    "label_2": ["--points", "200,150,2"],
    "label_5": ["--points", "200,150,5"],
    "label_minus_10": ["--points", "200,150,-10"],
    "label_half": ["--points", "200,150,0.5"],
    "label_nan": ["--points", "200,150,nan"],
    "point_one_number": ["--points", "200"],
    "point_four_numbers": ["--points", "1,2,1,4"],
    "point_words": ["--points", "x,y"],
    "point_empty": ["--points", ""],
    "box_3_numbers": ["--box", "1,2,3"],
    "box_5_numbers": ["--box", "1,2,3,4,5"],
    "box_inverted_x": ["--box", "400,40,50,280"],
    "box_inverted_y": ["--box", "50,280,400,40"],
    "box_nan": ["--box", "50,nan,400,280"],
    "box_inf": ["--box", "50,40,inf,280"],
    "box_words": ["--box", "a,b,c,d"],
    "box_empty": ["--box", ""],
    "box_inverted_with_point": ["--points", "200,150", "--box", "400,40,50,280"],
    "points_per_side_0": ["--everything", "--points-per-side", "0"],
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_prompts_one_line_exit_2(files, capsys, case):
    d = files
    out = d / f"bad_{case}"
    assert sam_cli([str(d / "ckpt"), str(d / "cat.png"), *BAD_ARGS[case], "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + bytes(20)],
                         ids=["empty", "text", "truncated_png"])
def test_unreadable_image_one_line_exit_2(files, capsys, tmp_path, content):
    (tmp_path / "bad.png").write_bytes(content)
    for image in (tmp_path / "bad.png", tmp_path / "missing.png"):
        assert sam_cli([str(files / "ckpt"), str(image), "--points", "1,1", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(image) in err[0]
    assert not (tmp_path / "o").exists()


def test_zero_area_box_is_accepted(files, capsys):
    """The reference accepts x0 == x1 or y0 == y1; so do the CLI and its overlay."""
    d = files
    assert sam_cli([str(d / "ckpt"), str(d / "cat.png"), "--box", "100,40,100,280", "--points", "100,150,-1",
                    "--out", str(d / "zero")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["masks"] == 1
    assert (d / "zero" / "overlay.png").exists()


@pytest.mark.parametrize("channels", [1, 3, 4], ids=["grey16", "rgb16", "rgba16"])
def test_16_bit_png_is_scaled_not_white(files, capsys, tmp_path, channels):
    from segjax.testing.png import png_bytes

    d = files
    cat = np.asarray(Image.open(d / "cat.png").convert("RGB"))
    rng = np.random.default_rng(channels)
    eight = cat[..., :1] if channels == 1 else cat
    v16 = eight.astype(np.uint16) * 256 + rng.integers(0, 256, eight.shape, dtype=np.uint16)  # >> 8 == eight
    if channels == 4:
        v16 = np.concatenate([v16, np.full(v16.shape[:2] + (1,), 40000, np.uint16)], -1)
    (tmp_path / "cat16.png").write_bytes(png_bytes(v16))
    args = ["--points", "200,150", "--box", "50,40,400,280"]
    assert sam_cli([str(d / "ckpt"), str(tmp_path / "cat16.png"), *args, "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    saved = np.load(tmp_path / "o" / "masks.npz")["masks"]
    pred = SamPredictor.from_checkpoint(d / "ckpt")
    pred.set_image(np.ascontiguousarray(np.broadcast_to(eight, cat.shape)))
    masks, _, _ = pred.predict(np.array([[200.0, 150.0]]), np.array([1]), np.array([50.0, 40.0, 400.0, 280.0]),
                               multimask_output=False)
    np.testing.assert_array_equal(saved, masks)
