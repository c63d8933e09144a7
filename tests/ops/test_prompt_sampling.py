"""SAM prompt simulation: every sampled point lies in the region it claims (mask, false
negative, false positive; inside the image), labels match, points are uniform over
their region, empty regions give the not-a-point label at (0, 0) without NaN, box noise
has the recipe's statistics (mean 0, std 10% of the side, at most 20 px, inside the
image)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops import prompt_sampling as ps

S, G = 64, 16  # r = 4 input pixels per grid pixel


def _to_grid(coords, size=S, grid=G):
    """S-frame points -> (row, col) of the grid pixel whose centre they are (exactly)."""
    r = size / grid
    j = (np.asarray(coords[..., 0]) + 0.5) / r - 0.5
    i = (np.asarray(coords[..., 1]) + 0.5) / r - 0.5
    np.testing.assert_array_equal(j, np.round(j))  # a pixel centre, not between pixels
    np.testing.assert_array_equal(i, np.round(i))
    return np.round(i).astype(int), np.round(j).astype(int)


def test_grid_points_are_pixel_centres():
    idx = jnp.arange(G * G)
    pts = np.asarray(ps.grid_points(idx, G, S))
    assert pts[0].tolist() == [1.5, 1.5]  # centre of input pixels 0..3 (index convention)
    assert pts[G + 2].tolist() == [2 * 4 + 1.5, 4 + 1.5]  # (x, y) of row 1, col 2
    same = np.asarray(ps.grid_points(jnp.arange(9), 3, 3))  # r = 1: the pixel itself
    assert same.tolist() == [[x, y] for y in range(3) for x in range(3)]


def _random_masks(rng, n, p=0.3):
    return rng.uniform(size=(n, G, G)) < p


def test_foreground_point_in_mask_and_uniform():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 64, p=0.05)
    masks[3] = False  # empty
    masks[4] = False
    masks[4, 7, 9] = True  # one pixel
    f = jax.jit(lambda k, m: ps.sample_foreground_point(k, m, S))
    for seed in range(5):
        coords, labels = f(jax.random.key(seed), jnp.asarray(masks))
        coords, labels = np.asarray(coords), np.asarray(labels)
        assert np.isfinite(coords).all()
        assert labels[3] == -1 and coords[3].tolist() == [0.0, 0.0]
        keep = masks.any(axis=(1, 2))
        assert (labels[keep] == 1).all()
        i, j = _to_grid(coords[keep])
        assert masks[keep][np.arange(keep.sum()), i, j].all()
        assert (i[4 - 1], j[4 - 1]) == (7, 9)  # the one-pixel mask (index 4 among the kept: 3 is empty)
    # uniform over a 4-pixel region: 4000 draws, each pixel within 5 sigma of 1000
    region = np.zeros((4000, G, G), bool)
    region[:, [2, 2, 9, 15], [3, 11, 0, 15]] = True
    coords, _ = f(jax.random.key(7), jnp.asarray(region))
    i, j = _to_grid(np.asarray(coords))
    counts = np.array([np.sum((i == a) & (j == b)) for a, b in [(2, 3), (2, 11), (9, 0), (15, 15)]])
    assert counts.sum() == 4000 and np.all(np.abs(counts - 1000) < 5 * np.sqrt(1000 * 0.75)), counts


def test_error_point_in_the_region_it_claims():
    rng = np.random.default_rng(1)
    n = 96
    gt = _random_masks(rng, n)
    pred = _random_masks(rng, n)
    hw = np.stack([rng.integers(8, S + 1, n), rng.integers(8, S + 1, n)], axis=-1).astype(np.int32)
    # cases: prediction == ground truth (no error), errors only in the padding (none count),
    # only false negatives, only false positives
    pred[0] = gt[0]
    hw[1] = (32, 48)
    pred[1] = gt[1]
    pred[1, 10:, :] = ~gt[1, 10:, :]  # grid rows >= 8 (centres >= 34) and columns >= 12 are padding
    pred[1, :, 13:] = ~gt[1, :, 13:]
    pred[2] = gt[2] & (rng.uniform(size=(G, G)) < 0.5)
    pred[3] = gt[3] | (rng.uniform(size=(G, G)) < 0.5)
    f = jax.jit(lambda k, p, g, h: ps.sample_error_point(k, p, g, h, S))
    labels_seen = set()
    for seed in range(6):
        coords, labels = f(jax.random.key(seed), jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(hw))
        coords, labels = np.asarray(coords), np.asarray(labels)
        assert np.isfinite(coords).all()
        for k in (0, 1):
            assert labels[k] == -1 and coords[k].tolist() == [0.0, 0.0], k
        assert labels[2] == 1 and labels[3] == 0
        real = labels >= 0
        i, j = _to_grid(coords[real])
        idx = np.nonzero(real)[0]
        fn = gt[idx, i, j] & ~pred[idx, i, j]
        fp = pred[idx, i, j] & ~gt[idx, i, j]
        assert np.all(np.where(labels[real] == 1, fn, fp))
        # inside the image: the grid pixel's centre is inside (h, w)
        r = S / G
        assert np.all((i + 0.5) * r < hw[idx, 0]) and np.all((j + 0.5) * r < hw[idx, 1])
        # the error-free cases are exactly those without an error inside the image
        inside = np.asarray(ps.valid_region(jnp.asarray(hw), G, S))
        assert np.array_equal(labels == -1, ~((gt != pred) & inside).any(axis=(1, 2)))
        labels_seen |= set(labels.tolist())
    assert labels_seen == {-1, 0, 1}


def test_valid_region_matches_pixel_centres():
    """A grid pixel is inside when its centre ((i + 0.5) r, continuous) is inside (h, w)."""
    region = np.asarray(ps.valid_region(jnp.asarray([[33, 64], [64, 6], [64, 2]]), G, S))
    assert region[0].sum(axis=0).tolist() == [8] * G  # centres 2, 6, .., 30 < 33; 34 is not
    assert region[1].sum(axis=1).tolist() == [1] * G  # centre 2 < 6, 6 is not
    assert not region[2].any()  # centre 2 is not < 2: a column mostly padding is outside


def _clipped_std(sigma, cap):
    """std of clip(N(0, sigma^2), -cap, cap)."""
    c = cap / sigma
    inside = math.erf(c / math.sqrt(2))
    density = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    return sigma * math.sqrt(inside - 2 * c * density + c * c * (1 - inside))


def test_noisy_box_statistics():
    n = 20000
    keys = jax.random.key(0)
    boxes = jnp.broadcast_to(jnp.asarray([300.0, 400.0, 400.0, 450.0]), (n, 4))  # 100 x 50
    big = jnp.broadcast_to(jnp.asarray([100.0, 100.0, 700.0, 900.0]), (n, 4))  # 600 x 800: std 60/80 -> clipped
    hw = jnp.asarray([1024, 1024])
    f = jax.jit(lambda k, b: ps.noisy_boxes(k, b, hw))
    d = np.asarray(f(keys, boxes)) - np.asarray(boxes)
    mean, std = d.mean(0), d.std(0)
    assert np.all(np.abs(mean) < 4 * np.array([10, 5, 10, 5]) / np.sqrt(n)), mean
    # std 10% of the side (10 px for x, 5 for y), the x noise clipped at 2 sigma (20 px)
    np.testing.assert_allclose(std, [_clipped_std(10, 20), 5, _clipped_std(10, 20), 5], rtol=0.02)
    assert np.abs(d).max() <= 20.0 and np.abs(d).max() > 19.0  # 2-sigma tails reach the cap
    db = np.asarray(f(jax.random.key(1), big)) - np.asarray(big)
    assert np.abs(db).max() <= 20.0
    assert np.mean(np.abs(db) == 20.0) > 0.6  # std 60 / 80: mostly at the cap
    # inside the image, corners ordered, for boxes at the border and tiny boxes
    edge = jnp.asarray([[0.0, 0.0, 30.0, 30.0], [1000.0, 990.0, 1024.0, 1024.0], [500.0, 500.0, 500.5, 500.5]])
    hw2 = jnp.asarray([[1024, 1024], [1000, 1010], [1024, 1024]])
    for seed in range(20):
        out = np.asarray(ps.noisy_boxes(jax.random.key(seed), edge, hw2))
        assert np.all(out >= 0) and np.all(out[:, [0, 2]] <= np.asarray(hw2)[:, 1:2])
        assert np.all(out[:, [1, 3]] <= np.asarray(hw2)[:, 0:1])
        assert np.all(out[:, 2] >= out[:, 0]) and np.all(out[:, 3] >= out[:, 1])
