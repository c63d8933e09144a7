"""roi_align / multiscale_roi_align against torchvision.ops (CPU kernel), fp32.

Tolerance: max |ours - torchvision| <= ATOL = 1e-5 on features of unit scale, forward
and gradient (outputs are convex combinations of the inputs; summation order is the
only difference; observed <= 2e-6).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from segjax.ops import multiscale_roi_align, roi_align
from segjax.ops.roi_align import fpn_levels, roi_align_weights

torch.set_num_threads(1)
ATOL = 1e-5


def random_boxes(rng: np.random.Generator, n: int, img_h: float, img_w: float, kinds: int = 9) -> np.ndarray:
    """(n, 4) XYXY boxes of every kind: inside, straddling an edge, fully outside (any
    side), tiny (sub-pixel), degenerate (x2 < x1 or y2 < y1) (kinds 0-4: none larger
    than the image), a few times to 40x the image, mostly outside (large and far
    off-centre), and long in one axis only (up to ~100x the image, with negative
    coordinates). kinds: draw from the first `kinds` kinds."""
    kinds = rng.integers(0, kinds, n)
    far = kinds == 6  # mostly outside: most of a large box lies beyond one corner
    cx, cy = rng.uniform(0, img_w, n), rng.uniform(0, img_h, n)
    w, h = rng.uniform(1, img_w / 2, n), rng.uniform(1, img_h / 2, n)
    cx = np.where(kinds == 1, rng.choice([-0.1, 1.1], n) * img_w, cx)  # straddles an edge
    side = rng.choice([-1.0, 1.0], n)
    cx = np.where(kinds == 2, img_w / 2 + side * (img_w / 2 + w / 2 + rng.uniform(0.5, 9, n)), cx)  # outside
    cy = np.where(kinds == 2, rng.uniform(-img_h, 2 * img_h, n), cy)
    w = np.where(kinds == 3, rng.uniform(0.01, 0.9, n), w)  # tiny
    h = np.where(kinds == 3, rng.uniform(0.01, 0.9, n), h)
    w = np.where(kinds == 4, -rng.uniform(0.1, 3, n), w)  # degenerate
    h = np.where(kinds == 4, rng.choice([-1.0, 1.0], n) * rng.uniform(0.1, 3, n), h)
    big = np.exp(rng.uniform(0, np.log(40), (2, n)))  # 1x .. 40x the image
    w = np.where((kinds == 5) | far, img_w * big[0], w)
    h = np.where((kinds == 5) | far, img_h * big[1], h)
    cx = np.where(far, np.where(rng.random(n) < 0.5, -0.45 * w, img_w + 0.45 * w), cx)
    cy = np.where(far, np.where(rng.random(n) < 0.5, -0.45 * h, img_h + 0.45 * h), cy)
    # long in one axis only (kind 7: y, kind 8: x), reaching far into negative coordinates
    h = np.where(kinds == 7, img_h * rng.uniform(20, 100, n), h)
    cy = np.where(kinds == 7, rng.uniform(-50, 10, n) * img_h, cy)
    w = np.where(kinds == 8, img_w * rng.uniform(20, 100, n), w)
    cx = np.where(kinds == 8, rng.uniform(-50, 10, n) * img_w, cx)
    w = np.where(kinds == 7, rng.uniform(1, img_w, n), w)
    h = np.where(kinds == 8, rng.uniform(1, img_h, n), h)
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


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _fwd_bwd(x, boxes, g, out, scale, sr, aligned, impl):
    """roi_align and its gradient w.r.t. x for the cotangent g, in one program."""
    ours, vjp = jax.vjp(lambda feats: roi_align(feats, boxes, out, scale, sr, aligned, impl=impl), x)
    return ours, vjp(g)[0]


def _tv_fwd_bwd(x, boxes, g, out, scale, sr, aligned):
    b, r = boxes.shape[:2]
    xt, yt = tv_roi_align(x, boxes, out, scale, sr, aligned)
    yt.backward(torch.from_numpy(g.reshape(b * r, *g.shape[2:])).permute(0, 3, 1, 2))
    return to_ours(yt, b, r), xt.grad.permute(0, 2, 3, 1).numpy()


# spatial_scale per (sr, aligned): boxes in a 1x, 2x, 3.3x, 4x and 7x larger image
CASE_SCALES = {False: (0.5, 0.3, 1.0, 1 / 7, 0.25), True: (1 / 7, 1.0, 0.25, 0.5, 0.3)}


@pytest.mark.parametrize("impl", ["gather", "matmul"])
@pytest.mark.parametrize("sr", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_every_box_matches_torchvision(impl, sr, aligned):
    """Forward and gradient vs torchvision for every kind of box (`random_boxes`: up
    to 40x the map in both axes and 100x in one, mostly or fully outside, tiny,
    degenerate), over seeds; each (sr, aligned) case has its own spatial_scale.
    Adaptive sampling (sr <= 0) takes up to ~300 samples per bin and axis here, far
    beyond any bound derived from the map; seed 0 has no box larger than the image
    (the short adaptive window), the others do (the long one)."""
    out = (3, 4)
    scale = CASE_SCALES[aligned][sr + 1]
    for seed in range(3):
        rng = np.random.default_rng([seed, sr + 1, int(aligned)])
        x = rng.standard_normal((B, H, W, C)).astype(np.float32)
        boxes = np.stack([random_boxes(rng, R, H / scale, W / scale, 5 if seed == 0 else 9) for _ in range(B)])
        g = rng.standard_normal((B, R, *out, C)).astype(np.float32)
        ours, grad = _fwd_bwd(jnp.asarray(x), jnp.asarray(boxes), jnp.asarray(g), out, scale, sr, aligned, impl)
        ref, ref_grad = _tv_fwd_bwd(x, boxes, g, out, scale, sr, aligned)
        assert ours.shape == (B, R, *out, C)
        err, gerr = np.abs(np.asarray(ours) - ref).max(), np.abs(np.asarray(grad) - ref_grad).max()
        print(f"{impl} sr={sr} aligned={aligned} seed={seed} scale={scale:.3f}: forward {err:.2e}, grad {gerr:.2e}")
        assert np.abs(ref).max() > 0.1  # the boxes do pool something
        assert err <= ATOL and gerr <= ATOL, (seed, err, gerr)
    # a second backward pass is bitwise identical
    again = _fwd_bwd(jnp.asarray(x), jnp.asarray(boxes), jnp.asarray(g), out, scale, sr, aligned, impl)[1]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(grad))


def test_adaptive_giant_boxes_are_exact():
    """Boxes 10^3..10^4.5 feature px long in one axis (thousands of samples per bin, nearly
    all outside the map), reaching far into negative coordinates: still exact."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, H, W, C)).astype(np.float32)
    n = 16
    span = 10.0 ** rng.uniform(3, 4.5, n)
    lo = -span * rng.uniform(0, 1, n)
    x1 = rng.uniform(-3, W, n)
    boxes = np.stack([x1, lo, x1 + rng.uniform(0.5, 6, n), lo + span], 1).astype(np.float32)
    boxes[::2] = boxes[::2][:, [1, 0, 3, 2]]  # every other box is long in x instead
    g = rng.standard_normal((1, n, 3, 4, C)).astype(np.float32)
    for aligned in (False, True):
        ref, ref_grad = _tv_fwd_bwd(x, boxes[None], g, (3, 4), 1.0, -1, aligned)
        for impl in ("gather", "matmul"):
            ours, grad = _fwd_bwd(jnp.asarray(x), jnp.asarray(boxes[None]), jnp.asarray(g), (3, 4), 1.0, -1,
                                  aligned, impl)
            # the averages over thousands of samples are small: compare relative to them
            np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
            np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0, atol=1e-5 * np.abs(ref_grad).max())


def test_max_samples_is_an_inexact_opt_in(data):
    """`max_samples` S equals the exact default while every bin needs <= S samples, and
    (as documented) not beyond."""
    x, _, _ = data
    inside = jnp.array([[[1.0, 2.0, 7.0, 5.0], [0.0, 0.0, 20.0, 16.0]]] * B)  # <= 4 samples per bin
    large = jnp.array([[[-30.0, -20.0, 50.0, 40.0], [0.0, 0.0, 20.0, 16.0]]] * B)  # 14 samples per bin in x
    for impl in ("gather", "matmul"):
        exact = roi_align(jnp.asarray(x), inside, 3, SCALE, 0, True, impl=impl)
        capped = roi_align(jnp.asarray(x), inside, 3, SCALE, 0, True, impl=impl, max_samples=4)
        np.testing.assert_allclose(np.asarray(capped), np.asarray(exact), atol=1e-6)
        exact = roi_align(jnp.asarray(x), large, 3, SCALE, 0, True, impl=impl)
        capped = roi_align(jnp.asarray(x), large, 3, SCALE, 0, True, impl=impl, max_samples=4)
        ref = to_ours(tv_roi_align(x, list(np.asarray(large)), 3, SCALE, 0, True)[1], B, 2)
        np.testing.assert_allclose(np.asarray(exact), ref, atol=ATOL)
        assert np.abs(np.asarray(capped) - ref).max() > 1e-2


@pytest.mark.parametrize("scale, sr, aligned", [(0.25, 3, True), (0.3, 2, False), (0.3, -1, True)])
def test_large_map_coordinates_are_exact(scale, sr, aligned):
    """On a 200 px map an ulp of a sample coordinate is ~1.5e-5 px: the sampling points
    must be computed with the kernel's own float operations (no reciprocal multiply, no
    fused multiply-add, also in `x1 * scale` with a scale that is not a power of two)
    for the outputs to agree to summation order (~1e-6)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 200, 200, 2)).astype(np.float32)
    side = np.exp(rng.uniform(np.log(16), np.log(512), (1, 200, 2)))
    ctr = rng.uniform(0, 200 / scale, (1, 200, 2))
    boxes = np.concatenate([ctr - side / 2, ctr + side / 2], -1).astype(np.float32)
    ref = to_ours(tv_roi_align(x, list(boxes), 7, scale, sr, aligned)[1], 1, 200)
    ours = roi_align(jnp.asarray(x), jnp.asarray(boxes), 7, scale, sr, aligned)
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
    ours = multiscale_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes), img, (5, 5), sr, impl=impl)
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
@pytest.mark.parametrize("sr, ms", [(0, None), (2, None), (0, 3)], ids=["adaptive", "sr2", "capped"])
def test_lowers_for_tpu_and_cuda(impl, sr, ms):
    feats = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    boxes = jax.ShapeDtypeStruct((2, 5, 4), jnp.float32)

    def fwd_bwd(f, b):
        out, vjp = jax.vjp(lambda f: roi_align(f, b, 7, 0.25, sr, True, impl=impl, max_samples=ms), f)
        return out, vjp(out)[0]

    exp = jax.export.export(jax.jit(fwd_bwd), platforms=("tpu", "cuda"))(feats, boxes)
    assert exp.platforms == ("tpu", "cuda")
    assert exp.out_avals[0].shape == (2, 5, 7, 7, 8)
    mexp = jax.export.export(jax.jit(lambda b: roi_align_weights(b, (16, 16), 7, 0.25, sr, True, ms)),
                             platforms=("tpu", "cuda"))(boxes)
    assert [a.shape for a in mexp.out_avals] == [(2, 5, 7, 16)] * 2


@pytest.mark.parametrize("impl", ["gather", "matmul"])
def test_bfloat16_features(data, impl):
    x, boxes, g = data
    ref = roi_align(jnp.asarray(x), jnp.asarray(boxes), (3, 4), SCALE, 2, True, impl=impl)
    f = lambda feats: roi_align(feats, jnp.asarray(boxes), (3, 4), SCALE, 2, True, impl=impl)  # noqa: E731
    out, vjp = jax.vjp(f, jnp.asarray(x, jnp.bfloat16))
    (grad,) = vjp(jnp.asarray(g, jnp.bfloat16))
    assert out.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)
