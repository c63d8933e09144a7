"""Box ops against torchvision (ops.boxes and detection._utils.BoxCoder), fp32."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from torchvision.models.detection._utils import BoxCoder

from segjax.ops import boxes as ops

torch.set_num_threads(1)


def rand_boxes(rng, n, size=100.0):
    xy = rng.uniform(-10, size, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(0.5, 50, (n, 2))], 1).astype(np.float32)


def test_area_and_iou():
    rng = np.random.default_rng(0)
    a, b = rand_boxes(rng, 30), rand_boxes(rng, 40)
    b[:5] = a[:5]  # identical pairs: IoU 1
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ours = np.asarray(ops.box_iou(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.diag(ours[:5, :5]), 1.0)
    np.testing.assert_allclose(np.asarray(ops.box_area(jnp.asarray(a))),
                               torchvision.ops.box_area(torch.from_numpy(a)).numpy())
    # batched leading axes
    both = np.asarray(ops.box_iou(jnp.asarray(np.stack([a, a])), jnp.asarray(np.stack([b, b]))))
    np.testing.assert_array_equal(both[1], ours)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_box_coder(weights):
    rng = np.random.default_rng(1)
    props, gt = rand_boxes(rng, 50), rand_boxes(rng, 50)
    coder = BoxCoder(weights)
    ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(props)).numpy()
    ours = np.asarray(ops.encode_boxes(jnp.asarray(gt), jnp.asarray(props), weights))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # decode, per-class deltas (N, K*4) with huge dw/dh to exercise the clip
    deltas = rng.normal(0, 2, (50, 3 * 4)).astype(np.float32)
    deltas[:5, 2] = 50.0
    ref = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(props)).numpy()
    ours = ops.decode_boxes(jnp.asarray(deltas.reshape(50, 3, 4)), jnp.asarray(props[:, None]), weights)
    np.testing.assert_allclose(np.asarray(ours).reshape(50, 12), ref, rtol=1e-6, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(ours)))
    # round trip
    back = ops.decode_boxes(ops.encode_boxes(jnp.asarray(gt), jnp.asarray(props), weights),
                            jnp.asarray(props), weights)
    np.testing.assert_allclose(np.asarray(back), gt, atol=1e-3)
    assert ops.BBOX_XFORM_CLIP == math.log(1000.0 / 16)


def test_clip_and_small_boxes():
    rng = np.random.default_rng(2)
    b = rand_boxes(rng, 40, size=120)
    ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(b), (60, 80)).numpy()
    np.testing.assert_array_equal(np.asarray(ops.clip_boxes(jnp.asarray(b), (60, 80))), ref)
    # per-image sizes broadcast against (B, R, 4)
    bb = np.stack([b, b])
    per = np.asarray(ops.clip_boxes(jnp.asarray(bb), jnp.array([[60, 80], [30, 40]])[:, None]))
    np.testing.assert_array_equal(per[0], ref)
    np.testing.assert_array_equal(per[1], torchvision.ops.clip_boxes_to_image(torch.from_numpy(b), (30, 40)).numpy())
    keep = torchvision.ops.remove_small_boxes(torch.from_numpy(ref), 8.0).numpy()
    mask = np.asarray(ops.remove_small_boxes(jnp.asarray(ref), 8.0))
    assert np.flatnonzero(mask).tolist() == keep.tolist() and 0 < mask.sum() < len(mask)


def test_cxcywh_round_trip():
    rng = np.random.default_rng(3)
    b = rand_boxes(rng, 10)
    ref = torchvision.ops.box_convert(torch.from_numpy(b), "xyxy", "cxcywh").numpy()
    c = ops.box_xyxy_to_cxcywh(jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(c), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ops.box_cxcywh_to_xyxy(c)), b, atol=1e-4)
