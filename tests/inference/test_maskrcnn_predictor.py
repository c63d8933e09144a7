"""MaskRCNNPredictor input checks: empty images, extreme aspect ratios, wrong dtype or
channels get a clear error; the most elongated images torchvision's transform accepts
give torchvision's detections (a seeded tiny torchvision twin, converted)."""

from __future__ import annotations

import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("torchvision")

from segjax.convert.__main__ import main as convert_cli  # noqa: E402
from segjax.inference import MaskRCNNPredictor  # noqa: E402
from segjax.models.maskrcnn.mask_rcnn import prepare_image  # noqa: E402
from segjax.testing.maskrcnn_ref import chelsea, tiny_torch, to_tensor  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torchvision model, our predictor): mask_rcnn_tiny (min_size 128, max_size 192)."""
    d = tmp_path_factory.mktemp("maskrcnn_pred")
    tv = tiny_torch(0)
    torch.save(tv.state_dict(), d / "tv.pth")
    assert convert_cli(["maskrcnn", str(d / "tv.pth"), str(d / "sj"), "--variant", "mask_rcnn_tiny",
                        "--bn-eps", "1e-5"]) == 0
    pred = MaskRCNNPredictor.from_checkpoint(d / "sj")
    assert (pred.min_size, pred.max_size) == (128, 192)
    return tv, pred


def _zeros(*shape, dtype=np.uint8):
    return np.zeros(shape, dtype)


# Each divided by zero (empty, too elongated) before; the dtype / channel ones were
# already refused and stay so.
BAD_IMAGES = {
    "zero_height": (_zeros(0, 10, 3), ValueError, "empty"),
    "zero_width": (_zeros(10, 0, 3), ValueError, "empty"),
    "zero_both": (_zeros(0, 0, 3), ValueError, "empty"),
    "1x193": (_zeros(1, 193, 3), ValueError, "too elongated.*0x192"),
    "193x1": (_zeros(193, 1, 3), ValueError, "too elongated.*192x0"),
    "1x5000": (_zeros(1, 5000, 3), ValueError, "too elongated"),
    "5000x1": (_zeros(5000, 1, 3), ValueError, "too elongated"),
    "2x5000": (_zeros(2, 5000, 3), ValueError, "too elongated"),
    "grey_2d": (_zeros(20, 30), ValueError, r"\(H, W, 3\)"),
    "one_channel": (_zeros(20, 30, 1), ValueError, r"\(H, W, 3\)"),
    "rgba": (_zeros(20, 30, 4), ValueError, r"\(H, W, 3\)"),
    "channels_first": (_zeros(3, 20, 30), ValueError, r"\(H, W, 3\)"),
    "batch": (_zeros(1, 20, 30, 3), ValueError, r"\(H, W, 3\)"),
    "float32": (_zeros(20, 30, 3, dtype=np.float32), TypeError, "uint8"),
    "float64_0_1": (np.full((20, 30, 3), 0.5), TypeError, "uint8"),
    "uint16": (_zeros(20, 30, 3, dtype=np.uint16), TypeError, "uint8"),
    "bool": (_zeros(20, 30, 3, dtype=bool), TypeError, "uint8"),
    "int64": (_zeros(20, 30, 3, dtype=np.int64), TypeError, "uint8"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_refused(tiny, case):
    image, error, match = BAD_IMAGES[case]
    with pytest.raises(error, match=match):
        tiny[1](image)


@pytest.mark.parametrize("hw", [(1, 192), (192, 1), (1, 193), (4, 769), (4, 768), (3, 576), (1, 1), (7, 5000),
                                (40, 1000), (1000, 40)])
def test_resized_size_is_torchvision_or_refused(tiny, hw):
    """Where torchvision's transform gives a size, prepare_image gives the same; where it
    fails (an empty resized side), the predictor refuses the image by name."""
    tv, pred = tiny
    img = np.zeros((*hw, 3), np.uint8)
    try:
        with torch.no_grad():
            il, _ = tv.transform([to_tensor(img)])
    except RuntimeError as e:
        assert "greater than 0" in str(e)
        with pytest.raises(ValueError, match="too elongated"):
            pred(img)
        return
    padded, rhw = prepare_image(img, pred.min_size, pred.max_size, pred.model.size_divisible)
    assert rhw == tuple(il.image_sizes[0]) and padded.shape[:2] == tuple(il.tensors.shape[-2:])


@pytest.mark.parametrize("crop", ["column_384x2", "strip_2x384"])
def test_extreme_aspect_ratio_matches_torchvision(tiny, crop):
    """A 2x384 strip of a photo resizes to 1x192 (its transpose to 192x1): the most
    elongated input the tiny model takes; detections as torchvision's.

    NOTE: torchvision's MultiScaleRoIAlign infers its feature scales once, from the
    first batch it sees, as 2 ** round(log2(feature height / resized image height)).
    A first image resized to 1 px high (padded to 32) gives 8 instead of 1/4, which
    it then keeps for every later image. We use the fixed strides, which is what it
    infers from any ordinary image; so the strip is compared with a torchvision
    model that has seen an ordinary photo first (the column, whose height is
    ordinary, is the very first image of the fixture's model)."""
    tv, pred = tiny
    photo = chelsea()
    if crop == "column_384x2":
        img = np.ascontiguousarray(np.concatenate([photo[:, 200:202], photo[:84, 300:302]])[:384])
    else:
        img = np.ascontiguousarray(photo[150:152, 30:414])
        with torch.no_grad():
            tv([to_tensor(photo)])  # sets torchvision's RoI pooling scales from an ordinary photo
    assert tv.roi_heads.box_roi_pool.scales in (None, [0.25, 0.125, 0.0625, 0.03125])
    out = pred(img)
    with torch.no_grad():
        ref = tv([to_tensor(img)])[0]
    assert tv.roi_heads.box_roi_pool.scales == [0.25, 0.125, 0.0625, 0.03125]
    assert all(np.isfinite(v).all() for v in out.values())
    assert out["masks"].shape == (len(out["boxes"]), 1, *img.shape[:2])
    rb, rl = ref["boxes"].numpy(), ref["labels"].numpy()
    assert len(out["boxes"]) == len(rb) > 0
    # near-tied scores (many boxes clipped to the same 1 px row) may swap ranks: match
    # each torchvision detection to ours by label and box
    d = np.abs(out["boxes"][:, None] - rb[None]).max(-1) + 1e9 * (out["labels"][:, None] != rl[None])
    mine = d.argmin(0)
    assert (d.min(0) <= 1e-2).all() and len(set(mine.tolist())) == len(rb)
    np.testing.assert_allclose(out["scores"][mine], ref["scores"].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["masks"][mine], ref["masks"].numpy(), atol=1e-3)
