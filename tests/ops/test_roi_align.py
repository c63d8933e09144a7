"""roi_align / multiscale_roi_align against torchvision.ops (CPU kernel), fp32.

Tolerance: max |ours - torchvision| <= ATOL on features of unit scale (outputs are
convex combinations of the inputs; summation order is the only difference).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from segjax.ops import multiscale_roi_align, roi_align
from segjax.ops.roi_align import default_max_samples, fpn_levels

torch.set_num_threads(1)
ATOL = 1e-5


def random_boxes(rng: np.random.Generator, n: int, img_h: float, img_w: float) -> np.ndarray:
    """(n, 4) XYXY boxes of every kind: inside, partly outside, fully outside, tiny
    (sub-pixel), degenerate (x2 < x1), larger than the image."""
    kinds = rng.integers(0, 6, n)
    cx, cy = rng.uniform(0, img_w, n), rng.uniform(0, img_h, n)
    w, h = rng.uniform(1, img_w / 2, n), rng.uniform(1, img_h / 2, n)
    cx = np.where(kinds == 1, rng.choice([-0.1, 1.1], n) * img_w, cx)  # straddles an edge
    cx = np.where(kinds == 2, img_w + w + rng.uniform(2, 9, n), cx)  # fully outside
    w = np.where(kinds == 3, rng.uniform(0.01, 0.9, n), w)  # tiny
    h = np.where(kinds == 3, rng.uniform(0.01, 0.9, n), h)
    w = np.where(kinds == 4, -rng.uniform(0.1, 3, n), w)  # degenerate
    w = np.where(kinds == 5, img_w * rng.uniform(1.0, 1.3, n), w)  # bigger than the map
    h = np.where(kinds == 5, img_h * rng.uniform(1.0, 1.3, n), h)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def tv_roi_align(x_nhwc, boxes, out, scale, sr, aligned):
    x = torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    y = torchvision.ops.roi_align(x, [torch.from_numpy(b) for b in boxes], out, scale, sr, aligned)
    return x, y  # y: (B*R, C, h, w)


def to_ours(y_tv, b, r):
    y = y_tv.detach().permute(0, 2, 3, 1).numpy()
    return y.reshape(b, r, *y.shape[1:])


# (B, H, W, C) features, spatial_scale 0.5 (boxes in a 2x larger image)
B, H, W, C, R, SCALE = 2, 9, 11, 3, 24, 0.5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, R, H / SCALE, W / SCALE) for _ in range(B)])
    g = rng.standard_normal((B, R, 3, 4, C)).astype(np.float32)
    return x, boxes, g


@pytest.mark.parametrize("impl", ["gather", "matmul"])
@pytest.mark.parametrize("sr", [2, 0], ids=["sr2", "adaptive"])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_forward_and_backward_match_torchvision(data, impl, sr, aligned):
    x, boxes, g = data
    out = (3, 4)
    # bound big enough for the 1.3x-the-image boxes, so adaptive mode is exact
    ms = 8 if sr <= 0 else None
    f = lambda feats: roi_align(feats, jnp.asarray(boxes), out, SCALE, sr, aligned, impl=impl,  # noqa: E731
                                max_samples=ms)
    ours, vjp = jax.vjp(f, jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(g))
    xt, yt = tv_roi_align(x, boxes, out, SCALE, sr, aligned)
    ref = to_ours(yt, B, R)
    yt.backward(torch.from_numpy(g.reshape(B * R, 3, 4, C)).permute(0, 3, 1, 2))
    ref_grad = xt.grad.permute(0, 2, 3, 1).numpy()
    assert ours.shape == (B, R, 3, 4, C)
    err, gerr = np.abs(np.asarray(ours) - ref).max(), np.abs(np.asarray(grad) - ref_grad).max()
    print(f"{impl} sr={sr} aligned={aligned}: forward {err:.2e}, grad {gerr:.2e}")
    assert np.abs(ref).max() > 0.1  # the boxes do pool something
    assert err <= ATOL and gerr <= ATOL
    # a second backward pass is bitwise identical
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.asarray(grad))


def test_default_bound_is_exact_inside_the_map(data):
    """Adaptive mode with the default max_samples equals torchvision for RoIs that fit."""
    x, _, _ = data
    rng = np.random.default_rng(1)
    x1 = rng.uniform(-2, W / SCALE - 3, (B, R))
    y1 = rng.uniform(-2, H / SCALE - 3, (B, R))
    boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(0.5, W / SCALE, (B, R)), W / SCALE),
                      np.minimum(y1 + rng.uniform(0.5, H / SCALE, (B, R)), H / SCALE)], -1).astype(np.float32)
    assert default_max_samples((H, W), 2) == (5, 6)
    for impl in ("gather", "matmul"):
        ours = roi_align(jnp.asarray(x), jnp.asarray(boxes), 2, SCALE, 0, True, impl=impl)
        ref = to_ours(tv_roi_align(x, list(boxes), 2, SCALE, 0, True)[1], B, R)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL)


def test_large_map_coordinates_are_exact():
    """On a 200 px map an ulp of a sample coordinate is ~1.5e-5 px: the sampling points
    must be computed with the kernel's own float operations (no reciprocal multiply, no
    fused multiply-add) for the outputs to agree to summation order (~1e-6)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 200, 200, 2)).astype(np.float32)
    side = np.exp(rng.uniform(np.log(16), np.log(512), (1, 200, 2)))
    ctr = rng.uniform(0, 800, (1, 200, 2))
    boxes = np.concatenate([ctr - side / 2, ctr + side / 2], -1).astype(np.float32)
    ref = to_ours(tv_roi_align(x, list(boxes), 7, 0.25, 3, True)[1], 1, 200)
    ours = roi_align(jnp.asarray(x), jnp.asarray(boxes), 7, 0.25, 3, True)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-6)


def test_hand_computed_ramp():
    """On f(y, x) = x, an aligned bin averages x at its sample points: the bin centre."""
    feat = jnp.broadcast_to(jnp.arange(16.0)[None, None, :, None], (1, 10, 16, 1))
    boxes = jnp.array([[[2.0, 1.0, 10.0, 5.0]]])
    for impl in ("gather", "matmul"):
        out = roi_align(feat, boxes, (2, 4), 1.0, 2, True, impl=impl)[0, 0, ..., 0]
        centres = 2.0 + (np.arange(4) + 0.5) * 2.0 - 0.5  # box starts at 2 - 0.5
        np.testing.assert_allclose(np.asarray(out), np.broadcast_to(centres, (2, 4)), atol=1e-6)
    # samples beyond y > H count as zero: a box hanging off the bottom averages fewer ones
    ones = jnp.ones((1, 4, 4, 1))
    out = roi_align(ones, jnp.array([[[0.0, 2.0, 4.0, 8.0]]]), 1, 1.0, 2, False)
    np.testing.assert_allclose(float(out.squeeze()), 0.5)  # samples at y=3.5 (in), 6.5 (out)


def test_no_gradient_into_boxes(data):
    x, boxes, _ = data
    gb = jax.grad(lambda b: roi_align(jnp.asarray(x), b, 3, SCALE, 2, True).sum())(jnp.asarray(boxes))
    assert not np.any(np.asarray(gb))


def test_bad_input():
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(jnp.zeros((2, 4, 4, 1)), jnp.zeros((1, 3, 4)), 2)
    with pytest.raises(ValueError, match="impl"):
        roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 3, 4)), 2, impl="conv")


# ----------------------------------------------------------------------------- FPN


@pytest.mark.parametrize("impl", ["gather", "matmul"])
@pytest.mark.parametrize("sr", [2, 0], ids=["sr2", "adaptive"])
def test_multiscale_matches_torchvision(impl, sr):
    rng = np.random.default_rng(2)
    img = (256, 320)  # levels 2..5: strides 4..32
    feats = [rng.standard_normal((B, img[0] // s, img[1] // s, 2)).astype(np.float32) for s in (4, 8, 16, 32)]
    n = 16
    side = np.exp(rng.uniform(np.log(20), np.log(600), (B, n)))  # spans every level
    aspect = np.exp(rng.uniform(-0.7, 0.7, (B, n)))
    cx, cy = rng.uniform(0, img[1], (B, n)), rng.uniform(0, img[0], (B, n))
    w, h = side * aspect, side / aspect
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).astype(np.float32)
    ms = 12 if sr <= 0 else None
    ours = multiscale_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes), img, (5, 5), sr,
                                impl=impl, max_samples=ms)
    pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 5, sr)
    x = collections.OrderedDict((str(i), torch.from_numpy(f).permute(0, 3, 1, 2)) for i, f in enumerate(feats))
    ref = pool(x, [torch.from_numpy(b) for b in boxes], [img] * B)
    ref = ref.permute(0, 2, 3, 1).numpy().reshape(B, n, 5, 5, 2)
    levels = np.asarray(fpn_levels(jnp.asarray(boxes), 2, 5))
    assert set(levels.ravel()) == {0, 1, 2, 3}  # every level is exercised
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL)


def test_fpn_levels_match_level_mapper():
    from torchvision.ops.poolers import LevelMapper

    rng = np.random.default_rng(3)
    side = np.exp(rng.uniform(np.log(4), np.log(1500), 500)).astype(np.float32)
    side[:4] = [112, 224, 448, 896]  # exact boundaries
    boxes = np.stack([np.zeros_like(side), np.zeros_like(side), side, side], 1)
    ref = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy()
    np.testing.assert_array_equal(np.asarray(fpn_levels(jnp.asarray(boxes), 2, 5)), ref)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("impl", ["gather", "matmul"])
def test_lowers_for_tpu_and_cuda(impl):
    feats = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    boxes = jax.ShapeDtypeStruct((2, 5, 4), jnp.float32)

    def fwd_bwd(f, b):
        out, vjp = jax.vjp(lambda f: roi_align(f, b, 7, 0.25, 0, True, impl=impl, max_samples=3), f)
        return out, vjp(out)[0]

    exp = jax.export.export(jax.jit(fwd_bwd), platforms=("tpu", "cuda"))(feats, boxes)
    assert exp.platforms == ("tpu", "cuda")
    assert exp.out_avals[0].shape == (2, 5, 7, 7, 8)


@pytest.mark.parametrize("impl", ["gather", "matmul"])
def test_bfloat16_features(data, impl):
    x, boxes, g = data
    ref = roi_align(jnp.asarray(x), jnp.asarray(boxes), (3, 4), SCALE, 2, True, impl=impl)
    f = lambda feats: roi_align(feats, jnp.asarray(boxes), (3, 4), SCALE, 2, True, impl=impl)  # noqa: E731
    out, vjp = jax.vjp(f, jnp.asarray(x, jnp.bfloat16))
    (grad,) = vjp(jnp.asarray(g, jnp.bfloat16))
    assert out.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)
