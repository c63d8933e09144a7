"""roi_pool against torchvision.ops.roi_pool (CPU kernel): forward and gradient, fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from segjax.ops import roi_pool

torch.set_num_threads(1)


def random_boxes(rng, n, img_h, img_w):
    """(n, 4) XYXY: inside, straddling an edge, fully outside, sub-pixel, degenerate."""
    kinds = rng.integers(0, 5, n)
    cx, cy = rng.uniform(0, img_w, n), rng.uniform(0, img_h, n)
    w, h = rng.uniform(1, img_w / 2, n), rng.uniform(1, img_h / 2, n)
    cx = np.where(kinds == 1, rng.choice([-0.1, 1.1], n) * img_w, cx)
    cx = np.where(kinds == 2, img_w + w + rng.uniform(2, 9, n), cx)
    w = np.where(kinds == 3, rng.uniform(0.01, 0.9, n), w)
    w = np.where(kinds == 4, -rng.uniform(0.1, 3, n), w)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_roi_pool_matches_torchvision(scale):
    rng = np.random.default_rng(int(scale * 8))
    b, h, w, c, r = 2, 10, 13, 3, 30
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    x[0, :4, :4] = 0.0  # ties (as after a ReLU): the gradient goes to the first maximum
    x[0, :4, :4, 1] = -1.0
    boxes = np.stack([random_boxes(rng, r, h / scale, w / scale) for _ in range(b)])
    boxes[0, 0] = [0.0, 0.0, 3.0 / scale, 3.0 / scale]  # inside the tied corner
    boxes[0, 1] = [2.5 / scale, 1.5 / scale, 2.5 / scale, 1.5 / scale]  # rounds to one pixel, halves
    g = rng.standard_normal((b, r, 3, 2, c)).astype(np.float32)

    ours, vjp = jax.vjp(lambda f: roi_pool(f, jnp.asarray(boxes), (3, 2), scale), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(g))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    yt = torchvision.ops.roi_pool(xt, [torch.from_numpy(bb) for bb in boxes], (3, 2), scale)
    yt.backward(torch.from_numpy(g.reshape(b * r, 3, 2, c)).permute(0, 3, 1, 2))
    ref = yt.detach().permute(0, 2, 3, 1).numpy().reshape(b, r, 3, 2, c)
    np.testing.assert_array_equal(np.asarray(ours), ref)  # max pooling: exact
    np.testing.assert_allclose(np.asarray(grad), xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert (ref == 0).all(axis=(2, 3, 4)).sum() > 0  # some RoIs are empty (outside the map)


@pytest.mark.parametrize("seed", [0, 1])
def test_roi_pool_exact_for_boxes_larger_than_the_map(seed):
    """Boxes several times the map, mostly outside it: the default stays exact."""
    rng = np.random.default_rng(seed)
    b, h, w, c, r, scale = 1, 9, 12, 2, 24, 0.25
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    cx, cy = rng.uniform(-2, 2, r) * w / scale, rng.uniform(-2, 2, r) * h / scale
    bw, bh = rng.uniform(1, 8, r) * w / scale, rng.uniform(1, 8, r) * h / scale
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)[None]
    g = rng.standard_normal((b, r, 2, 3, c)).astype(np.float32)
    ours, vjp = jax.vjp(lambda f: roi_pool(f, jnp.asarray(boxes), (2, 3), scale), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(g))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    yt = torchvision.ops.roi_pool(xt, [torch.from_numpy(boxes[0])], (2, 3), scale)
    yt.backward(torch.from_numpy(g.reshape(r, 2, 3, c)).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(ours), yt.detach().permute(0, 2, 3, 1).numpy()[None])
    np.testing.assert_allclose(np.asarray(grad), xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    # an opt-in bound smaller than the widest bin is inexact (documented)
    small = roi_pool(jnp.asarray(x), jnp.asarray(boxes), (2, 3), scale, max_bin=2)
    assert not np.array_equal(np.asarray(small), np.asarray(ours))


def test_roi_pool_hand_computed():
    feat = jnp.arange(16.0).reshape(1, 4, 4, 1)  # value = 4 y + x
    out = roi_pool(feat, jnp.array([[[0.0, 0.0, 3.0, 3.0]]]), 2, 1.0)[0, 0, ..., 0]
    # RoI 4x4 px, bins of 2: maxima at the bottom-right of each 2x2 block
    np.testing.assert_array_equal(np.asarray(out), [[5.0, 7.0], [13.0, 15.0]])
