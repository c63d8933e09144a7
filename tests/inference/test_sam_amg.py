"""SamAutomaticMaskGenerator against the official `segment_anything` one.

Two kinds of test, both on skimage's chelsea with the same seeded random tiny SAM on
both sides (see test_sam_predictor.py), points_per_side 8 or 4 to keep them cheap:

- End to end with the real (random) model. A random SAM predicts texture-like masks
  that cover the whole image (every box is the image box, stabilities ~0), so the
  thresholds are off and box NMS is disabled (thresh 1.0) for a set of 48 masks;
  with the default NMS exactly one survives on both sides.
- The whole generator pipeline (crops, point batches, IoU / stability filtering,
  upscaling, crop-edge filtering, RLE, NMS within and across crops, small-region
  removal, output modes) with the model's decoder replaced, on both sides, by the same
  deterministic "blob decoder": low-res logits of discs around each point (three
  radii, per-point amplitude -> stability (a-1)/(a+1), a hole and an island), and
  pseudo-random IoU predictions. That gives local masks, overlaps for NMS and masks
  cut by crop edges, which a random model cannot.

Mask sets are matched one-to-one by mask IoU >= 0.99; matched records must carry the
same point, crop box, box (within a pixel) and area (1%), and scores within SCORE_TOL.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("segment_anything")

from segment_anything import SamAutomaticMaskGenerator as OfficialAMG

from segjax.inference.sam import rle
from segjax.inference.sam.amg import SamAutomaticMaskGenerator
from segjax.inference.sam.predictor import SamInputError, SamPredictor
from segjax.testing.images import chelsea as photo
from segjax.testing.sam_official import TINY, converted

SCORE_TOL = 1e-4  # predicted IoU (fp32 decoder parity) and stability (pixel counts of ~1e5)
torch.set_num_threads(1)
OPTS = dict(points_per_side=8, pred_iou_thresh=0.6, stability_score_thresh=0.75)  # for the blob decoder


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam_amg")
    official, ckpt = converted(d, TINY, seed=0)
    return official, SamPredictor.from_checkpoint(ckpt)


def decode(seg):
    if isinstance(seg, np.ndarray):
        return seg
    if isinstance(seg["counts"], list):
        return rle.rle_to_mask(seg)
    from pycocotools import mask as mask_utils

    return mask_utils.decode(dict(seg, counts=seg["counts"].encode())).astype(bool)


def mask_iou(a, b) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def assert_same_records(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    masks_o = [decode(r["segmentation"]) for r in ours]
    masks_t = [decode(r["segmentation"]) for r in theirs]
    used = set()
    for j, (rt, mt) in enumerate(zip(theirs, masks_t)):
        best = max((i for i in range(len(ours)) if i not in used), key=lambda i: mask_iou(masks_o[i], mt))
        ro = ours[best]
        assert mask_iou(masks_o[best], mt) >= 0.99, j
        used.add(best)
        assert set(ro) == set(rt)
        assert ro["point_coords"] == rt["point_coords"] and ro["crop_box"] == rt["crop_box"]
        assert np.abs(np.subtract(ro["bbox"], rt["bbox"])).max() <= 1
        assert abs(ro["area"] - rt["area"]) <= 0.01 * rt["area"] + 1
        assert ro["predicted_iou"] == pytest.approx(rt["predicted_iou"], abs=SCORE_TOL)
        assert ro["stability_score"] == pytest.approx(rt["stability_score"], abs=SCORE_TOL)
        assert isinstance(ro["area"], int) and all(isinstance(v, int) for v in ro["bbox"] + ro["crop_box"])


def blob_decoder(points: np.ndarray, img_size: int = 256, low: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) float32 points in the resized-input frame -> low-res logits (P, 3, low, low)
    float32 and IoU predictions (P, 3) float32, deterministic in the points."""
    points = np.asarray(points, np.float32).astype(np.float64)
    g = (np.arange(low) + 0.5) * (img_size / low)
    x, y = points[:, 0, None, None], points[:, 1, None, None]
    d2 = (g[None, None, :] - x) ** 2 + (g[None, :, None] - y) ** 2  # (P, low, low)
    frac = lambda v: v - np.floor(v)  # noqa: E731
    amp = 4.0 + 36.0 * frac(np.sin(points[:, 0] * 12.9898 + points[:, 1] * 78.233) * 43758.5453)
    logits = []
    for k, r in enumerate((14.0, 30.0, 60.0)):
        blob = amp[:, None, None] * (1.0 - d2 / r**2)
        if k == 2:  # a hole off-centre and a small island beyond the rim
            hole = ((g[None, None, :] - x - 20) ** 2 + (g[None, :, None] - y) ** 2) < 5.0**2
            blob = np.where(hole, -5.0, blob)
            island = ((g[None, None, :] - x) ** 2 + (g[None, :, None] - y - 75) ** 2) < 6.0**2
            blob = np.where(island, 5.0, blob)
        logits.append(np.maximum(blob, -30.0))
    iou = 0.5 + 0.5 * frac(np.sin(points[:, :1] * 3.1 + points[:, 1:] * 7.7 + np.arange(3)) * 9631.17)
    return np.stack(logits, axis=1).astype(np.float32), iou.astype(np.float32)


def patch_blob_decoder(official_amg: OfficialAMG, ours: SamAutomaticMaskGenerator) -> None:
    """Replaces the prompt encoder + mask decoder of both generators by `blob_decoder`."""
    import jax.numpy as jnp

    ref_pred = official_amg.predictor

    def predict_torch(point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        assert multimask_output and return_logits and point_coords.shape[1] == 1
        low, iou = blob_decoder(point_coords[:, 0].numpy())
        low = torch.from_numpy(low)
        masks = ref_pred.model.postprocess_masks(low, ref_pred.input_size, ref_pred.original_size)
        return masks, torch.from_numpy(iou), low

    ref_pred.predict_torch = predict_torch

    def decode(coords, labels, mask_input=None, multimask_output=True, image=None):
        assert multimask_output and (labels[:, 0] == 1).all() and (labels[:, 1] == -1).all()
        low, iou = blob_decoder(coords[:, 0])
        return jnp.asarray(low), jnp.asarray(iou)

    ours.predictor = copy.copy(ours.predictor)
    ours.predictor.decode = decode


def both(sam, **opts):
    official, predictor = sam
    ref = OfficialAMG(official, **{**OPTS, **opts})
    ours = SamAutomaticMaskGenerator(predictor, **{**OPTS, **opts})
    patch_blob_decoder(ref, ours)
    return ref, ours


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_same_masks_as_reference_blob_decoder(sam, crop_n_layers, capsys):
    # layer 1: 4 x 4 points per crop (exercises crop_n_points_downscale_factor, keeps it cheap)
    ref, ours = both(sam, crop_n_layers=crop_n_layers, crop_n_points_downscale_factor=2)
    image = photo()
    theirs, mine = ref.generate(image), ours.generate(image)
    with capsys.disabled():
        print(f"\nAMG (blob decoder) crop_n_layers={crop_n_layers}: {len(mine)} masks (reference {len(theirs)})")
    assert len(theirs) >= 10, "too few masks for a meaningful test"
    assert_same_records(mine, theirs)
    if crop_n_layers:
        assert len({tuple(r["crop_box"]) for r in theirs}) > 2, "no mask from a crop survived"
    # the records come in the reference's order (NMS order)
    assert [r["point_coords"] for r in mine] == [r["point_coords"] for r in theirs]


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes(sam, mode):
    if mode == "coco_rle":
        importorskip("pycocotools")
    ref, ours = both(sam, output_mode=mode)
    image = photo()
    theirs, mine = ref.generate(image), ours.generate(image)
    assert all(isinstance(r["segmentation"], dict) for r in mine)
    kind = list if mode == "uncompressed_rle" else str
    assert all(isinstance(r["segmentation"]["counts"], kind) for r in mine)
    assert_same_records(mine, theirs)


AREA = 600  # px: the blob decoder's holes and islands are ~250-350 px at chelsea's size


def test_small_region_removal(sam):
    from segjax.inference.sam.mask_regions import remove_small_regions

    image = photo()
    ref, ours = both(sam, min_mask_region_area=AREA)
    mine = ours.generate(image)
    plain = both(sam)[1].generate(image)
    assert 0 < len(mine) <= len(plain)
    changed = 0
    for r in mine:  # no island or hole under the area remains
        for mode in ("holes", "islands"):
            assert not remove_small_regions(r["segmentation"], AREA, mode)[1]
    for r in plain:
        changed += any(remove_small_regions(r["segmentation"], AREA, mode)[1] for mode in ("holes", "islands"))
    assert changed > 0, "the test masks have no small region to remove"
    importorskip("cv2")  # the reference needs OpenCV for this option
    assert_same_records(mine, ref.generate(image))


@pytest.mark.parametrize("box_nms_thresh", [1.0, 0.7])
def test_real_model_end_to_end(sam, box_nms_thresh):
    official, predictor = sam
    opts = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                box_nms_thresh=box_nms_thresh)
    image = photo()
    theirs = OfficialAMG(official, **opts).generate(image)
    mine = SamAutomaticMaskGenerator(predictor, **opts).generate(image)
    assert len(theirs) == (48 if box_nms_thresh == 1.0 else 1)
    assert_same_records(mine, theirs)


def test_options_and_errors(sam):
    _, predictor = sam
    with pytest.raises(AssertionError, match="Exactly one"):
        SamAutomaticMaskGenerator(predictor, points_per_side=None)
    with pytest.raises(SamInputError, match="output_mode"):
        SamAutomaticMaskGenerator(predictor, output_mode="png")
    grid = np.array([[0.5, 0.5], [0.25, 0.75]])
    amg = SamAutomaticMaskGenerator(predictor, points_per_side=None, point_grids=[grid], pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, points_per_batch=1)
    recs = amg.generate(photo())
    assert {tuple(r["point_coords"][0]) for r in recs} <= {(225.5, 150.0), (112.75, 225.0)}
    assert SamAutomaticMaskGenerator(predictor, points_per_side=4, pred_iou_thresh=2.0).generate(photo()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(points_per_side=0), "points_per_side"),
    (dict(points_per_side=-3), "points_per_side"),
    (dict(points_per_side=2.5), "points_per_side"),
    (dict(points_per_side=float("nan")), "points_per_side"),
    (dict(crop_n_layers=-1), "crop_n_layers"),
    (dict(points_per_side=None, point_grids=[np.array([[0.5, np.nan]])]), "non-finite"),
    (dict(points_per_side=None, point_grids=[np.array([[0.5, np.inf]])]), "non-finite"),
    (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), r"\(N, 2\)"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), r"\(N, 2\)"),
    (dict(points_per_side=None, point_grids=[np.array([["a", "b"]])]), "numbers"),
    (dict(points_per_batch=0), "points_per_batch"),
])
def test_bad_options_are_refused(sam, kwargs, match):
    """Each ran to an IndexError deep in the generator, or NaN prompts, before."""
    with pytest.raises(SamInputError, match=match):
        SamAutomaticMaskGenerator(sam[1], **kwargs)
