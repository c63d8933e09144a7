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

from segjax.convert.__main__ import main as convert_cli
from segjax.inference.sam.cli import main as sam_cli
from segjax.inference.sam.predictor import SamPredictor
from segjax.testing.sam_official import TINY, make_official


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import skimage.data

    d = tmp_path_factory.mktemp("sam_cli")
    torch.save(make_official(TINY, seed=0).state_dict(), d / "sam.pth")
    assert convert_cli(["sam", str(d / "sam.pth"), str(d / "ckpt")]) == 0
    Image.fromarray(skimage.data.chelsea()).save(d / "cat.png")
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
