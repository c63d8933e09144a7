"""Interactive evaluation: RITM click placement, NoC capping, metrics on known predictors, SAM smoke."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.evaluators import interactive
from segjax.evaluators.interactive import Click, next_click, number_of_clicks, simulate_clicks
from segjax.inference.sam.postprocess import upscale_masks
from segjax.testing.params import abstract_params, random_params


def _square(h, w, y0, x0, size):
    m = np.zeros((h, w), bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_first_click_is_the_centre_of_a_square():
    gt = _square(20, 30, 4, 11, 7)  # rows 4..10, cols 11..17: centre (7, 14)
    assert next_click(gt, np.zeros_like(gt)) == Click(7, 14, True)
    # An object touching the border: the border counts as boundary (RITM pads), so the
    # farthest point of the whole 7 x 7 image is its centre; of a 5 x 9 image the first
    # (row-major) of its equally far middle-row points.
    full = np.ones((7, 7), bool)
    assert next_click(full, np.zeros_like(full)) == Click(3, 3, True)
    wide = np.ones((5, 9), bool)
    assert next_click(wide, np.zeros_like(wide)) == Click(2, 2, True)


def test_error_click_takes_the_larger_region():
    gt = _square(40, 40, 2, 2, 11)
    pred = gt.copy()
    pred[2:4, 2:13] = False  # false negative: a 2-row strip
    pred |= _square(40, 40, 20, 20, 9)  # false positive: a 9 x 9 square, centre (24, 24)
    assert next_click(gt, pred) == Click(24, 24, False)
    pred2 = gt & ~_square(40, 40, 3, 3, 9)  # a 9 x 9 hole in the object: false negative wins
    pred2 |= _square(40, 40, 30, 30, 3)  # a small false positive
    assert next_click(gt, pred2) == Click(7, 7, True)
    # Equal sizes: the false positives win (RITM: positive only when strictly larger).
    gt3, pred3 = _square(30, 30, 2, 2, 5), _square(30, 30, 20, 20, 5)
    assert next_click(gt3, pred3).positive is False
    # No error left, or only clicked pixels: no click.
    assert next_click(gt, gt) is None
    tiny = np.zeros((9, 9), bool)
    tiny[4, 4] = True
    not_clicked = np.ones_like(tiny)
    not_clicked[4, 4] = False
    assert next_click(tiny, np.zeros_like(tiny), not_clicked) is None


def test_number_of_clicks_is_capped():
    ious = np.array([[0.5, 0.86, 0.95], [0.2, 0.3, 0.4], [0.91, 0.5, 0.6]])
    np.testing.assert_array_equal(number_of_clicks(ious, 0.85, 20), [2, 20, 1])
    np.testing.assert_array_equal(number_of_clicks(ious, 0.90, 20), [3, 20, 1])


class Fake:
    """A `Decode` with a fixed rule; records every call."""

    def __init__(self, gt, rule):
        self.gt, self.rule, self.calls = gt, rule, []

    def set_image(self, image, hw):
        pass

    def __call__(self, coords, labels, mask_input, multimask):
        self.calls.append((coords.copy(), labels.copy(), None if mask_input is None else mask_input.copy(), multimask))
        masks = self.rule(self.gt, coords, labels, len(self.calls))  # (P, h, w)
        low = np.full((len(masks), 8, 8), float(len(self.calls)), np.float32)  # tells which round fed it
        return masks, low, np.full(len(masks), 0.5, np.float32)


def _example(gt_masks, s=None, valid=None):
    p, h, w = gt_masks.shape
    s = s or max(h, w)
    masks = np.zeros((p, s, s), bool)
    masks[:, :h, :w] = gt_masks
    return {"image": np.zeros((s, s, 3), np.float32), "image_hw": np.array([h, w]), "masks": masks,
            "valid": np.ones(p, bool) if valid is None else valid}


def _gts():
    return np.stack([_square(24, 32, 3, 3, 8), _square(24, 32, 10, 15, 12), _square(24, 32, 0, 20, 5)])


def test_perfect_predictor():
    gt = _gts()
    fake = Fake(gt, lambda g, c, lab, n: g)
    ious, box, skipped, pictures = interactive.collect(fake, [_example(gt)] * 3, num_draw=2)
    metrics = interactive.summarize(ious, box, num_skipped=skipped)
    assert metrics["miou@1"] == metrics["miou@5"] == metrics["miou_box"] == 1.0
    assert metrics["noc@85"] == metrics["noc@90"] == 1.0 and metrics["nof@90"] == 0.0
    assert metrics["num_masks"] == 9 and skipped == 0
    # Per image: stops once every mask has 5 clicks' worth of rounds at IoU >= 0.9 (perfect
    # masks add no clicks), then one box round.
    assert len(fake.calls) == 3 * (5 + 1)
    # The first mask of each of the first num_draw images.
    assert len(pictures) == 2 and pictures[0].dtype == np.uint8 and pictures[0].shape[-1] == 3


def test_fixed_predictor_known_iou_and_prompts():
    gt = _gts()
    half = gt.copy()
    half[:, :, 16:] = False  # the left half of the image: IoU known per mask

    fake = Fake(gt, lambda g, c, lab, n: half)
    ious, box, _, _ = interactive.collect(fake, [_example(gt)], max_clicks=6)
    expected = interactive.mask_iou(half, gt)
    np.testing.assert_allclose(ious, np.repeat(expected[:, None], 6, axis=1))
    metrics = interactive.summarize(ious, box, max_clicks=6)
    assert metrics["miou@3"] == pytest.approx(expected.mean())
    # Mask 0 lies in the left half (IoU 1: NoC 1); the others never reach 0.85: the cap (6).
    assert metrics["noc@85"] == pytest.approx((1 + 6 + 6) / 3)
    assert metrics["nof@85"] == pytest.approx(2 / 3)
    # Round 1: multimask, no mask input, the first click at the object's centre plus the
    # padding point; round 2: single mask, the mask input is round 1's logits.
    coords, labels, mask_input, multimask = fake.calls[0]
    assert multimask and mask_input is None
    assert labels[1, :3].tolist() == [1, -1, -10] and coords[1, 0].tolist() == [20.0, 15.0]  # x, y of (15, 20)
    coords, labels, mask_input, multimask = fake.calls[1]
    assert not multimask and (mask_input == 1.0).all()
    # Mask 2 (cols 20..24, wholly in the right half): the prediction is empty, so click 2 is
    # another foreground click; mask 1's false negatives (cols 16..26) beat nothing.
    assert labels[1, :3].tolist() == [1, 1, -1]
    # The box round: the tight box (x2 = last + 1), single mask.
    coords, labels, mask_input, multimask = fake.calls[-1]
    assert labels.tolist() == [[2, 3]] * 3 and not multimask
    np.testing.assert_array_equal(coords[1].reshape(4), [15, 10, 27, 22])


def test_false_positive_clicks_are_negative():
    gt = _gts()[:1]
    extra = _square(24, 32, 14, 20, 9)  # a false positive square, centre (18, 24)
    fake = Fake(gt, lambda g, c, lab, n: g | extra)
    simulate_clicks(fake, gt, max_clicks=3)
    _, labels, _, _ = fake.calls[1]
    coords = fake.calls[1][0]
    assert labels[0, :3].tolist() == [1, 0, -1] and coords[0, 1].tolist() == [24.0, 18.0]


def test_empty_and_padding_masks_are_skipped():
    gt = _gts()
    gt[1] = False  # an empty ground truth
    valid = np.array([True, True, False])
    fake = Fake(gt[:1], lambda g, c, lab, n: g)  # what is left: mask 0
    ious, box, skipped, _ = interactive.collect(fake, [_example(gt, valid=valid)])
    assert len(ious) == 1 and skipped == 1
    empty = interactive.summarize(np.zeros((0, 20)), np.zeros(0))
    assert empty["num_masks"] == 0 and np.isnan(empty["miou@1"])
    # Batches work too: rows with example_valid False are dropped.
    ex = _example(_gts())
    batch = {k: np.stack([v, v]) for k, v in ex.items()}
    batch["example_valid"] = np.array([True, False])
    ious, _, _, _ = interactive.collect(Fake(_gts(), lambda g, c, lab, n: g), [batch])
    assert len(ious) == 3


def test_evaluate_interactive_tiny_sam():
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64, encoder_depth=2,
                         encoder_global_attn_indexes=(1,), window_size=2)
    shapes = abstract_params(model, jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]]), jnp.zeros((1, 1, 2, 2)),
                             jnp.zeros((1, 1, 2), jnp.int32))
    params = random_params(shapes, seed=0)
    pos = shapes["image_encoder"]["pos_embed"].shape  # SAM's table is (1, h, w, D), not MAE's sin-cos
    params["image_encoder"]["pos_embed"] = 0.02 * np.random.default_rng(1).standard_normal(pos, np.float32)
    gt = np.stack([_square(40, 64, 5, 5, 20), _square(40, 64, 10, 30, 25)])
    ex = _example(gt, s=64)
    ex["image"][:40, :64] = np.random.default_rng(0).uniform(0, 255, (40, 64, 3))
    metrics, pictures = interactive.evaluate_interactive(model, params, [ex], max_clicks=3, report_clicks=(1, 3),
                                                         num_draw=1)
    assert set(metrics) >= {"miou@1", "miou@3", "noc@85", "noc@90", "miou_box", "num_masks"}
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["num_masks"] == 2
    assert 0 <= metrics["miou@1"] <= 1 and 1 <= metrics["noc@90"] <= 3
    assert len(pictures) == 1 and pictures[0].ndim == 3
    # The decoder keeps, per prompt, the output of highest predicted IoU, upscaled as
    # Sam.postprocess_masks does and cropped to the image.
    decoder = interactive.SamDecoder(model, {"params": params})
    decoder.set_image(ex["image"], (40, 64))
    coords, labels = np.array([[[10.0, 12.0], [0, 0]]] * 2, np.float32), np.array([[1, -1]] * 2, np.int32)
    masks, low, iou = decoder(coords, labels, None, True)
    predict = jax.jit(lambda prm, *a: model.apply({"params": prm}, *a, method="predict_masks"))
    out = predict(params, decoder.features, jnp.asarray(coords)[None], jnp.asarray(labels)[None])
    k = np.argmax(np.asarray(out["iou_predictions"][0]), axis=-1)
    np.testing.assert_allclose(iou, np.asarray(out["iou_predictions"][0])[np.arange(2), k], rtol=1e-6)
    np.testing.assert_allclose(low, np.asarray(out["low_res_logits"][0])[np.arange(2), k], rtol=1e-5, atol=1e-6)
    up = np.asarray(upscale_masks(jnp.asarray(low), 64, (64, 64), (64, 64)))
    np.testing.assert_array_equal(masks, up[:, :40, :64] > 0)
    assert masks.shape == (2, 40, 64) and low.shape == (2, 16, 16)


def _next_click_whole_image(gt, pred, not_clicked):
    """RITM's clicker as written: distance transforms of the whole padded image."""
    from scipy.ndimage import distance_transform_edt

    dts = [distance_transform_edt(np.pad(r, 1))[1:-1, 1:-1] * not_clicked for r in (gt & ~pred, pred & ~gt)]
    fn_max, fp_max = dts[0].max(), dts[1].max()
    if max(fn_max, fp_max) == 0:
        return None
    dt = dts[0] if fn_max > fp_max else dts[1]
    y, x = np.argwhere(dt == dt.max())[0]
    return Click(int(y), int(x), bool(fn_max > fp_max))


def test_next_click_on_the_region_box_equals_the_whole_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(3, 24, 2)
        gt = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        pred = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        not_clicked = rng.random((h, w)) > 0.1
        assert next_click(gt, pred, not_clicked) == _next_click_whole_image(gt, pred, not_clicked)
