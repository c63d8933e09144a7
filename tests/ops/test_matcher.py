"""Matcher and balanced sampler against torchvision.models.detection._utils."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("torchvision")

from torchvision.models.detection._utils import Matcher

from segjax.ops import box_iou, match, sample_balanced

torch.set_num_threads(1)


def iou_with_ties(rng, m, n):
    xy = rng.uniform(0, 100, (m, 2))
    gt = np.concatenate([xy, xy + rng.uniform(10, 40, (m, 2))], 1)
    xy = rng.uniform(0, 100, (n, 2))
    props = np.concatenate([xy, xy + rng.uniform(10, 40, (n, 2))], 1)
    props[:6] = np.repeat(gt[:3], 2, axis=0)  # exact duplicates: ties at IoU 1
    props[6:9] = gt[3:4] + [200, 200, 200, 200]  # far away
    iou = np.array(box_iou(jnp.asarray(gt, jnp.float32), jnp.asarray(props, jnp.float32)))
    iou[4, :] = np.where(iou[4] > 0, 0.2, 0.0)  # a gt whose best is a low-quality tie
    return iou


@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("thr", [(0.7, 0.3), (0.5, 0.5)])
def test_match_equals_torchvision(thr, allow_low):
    rng = np.random.default_rng(0)
    iou = iou_with_ties(rng, 8, 300)
    ref = Matcher(*thr, allow_low_quality_matches=allow_low)(torch.from_numpy(iou)).numpy()
    ours = np.asarray(match(jnp.asarray(iou), None, *thr, allow_low))
    np.testing.assert_array_equal(ours, ref)
    assert {-1, 0}.issubset(set(ours.tolist()))


def test_match_with_padded_ground_truth():
    rng = np.random.default_rng(1)
    iou = iou_with_ties(rng, 8, 300)
    valid = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    padded = iou.copy()
    padded[~valid] = rng.uniform(0, 1, (2, 300))  # garbage in the padding rows
    ref = Matcher(0.7, 0.3, True)(torch.from_numpy(iou[valid])).numpy()
    ref = np.where(ref >= 0, np.flatnonzero(valid)[np.maximum(ref, 0)], ref)
    ours = np.asarray(match(jnp.asarray(padded), jnp.asarray(valid), 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, ref)
    # no ground truth at all: everything is background
    none = np.asarray(match(jnp.asarray(padded), jnp.zeros(8, bool), 0.7, 0.3, True))
    assert np.all(none == -1)


def test_sample_balanced():
    labels = np.full(1000, -1, np.int32)
    labels[:40] = 1
    labels[100:700] = 0
    sample = jax.jit(lambda lab, k: sample_balanced(lab, 256, 0.25, k))
    pos, neg = sample(jnp.asarray(labels), jax.random.key(0))
    pos, neg = np.asarray(pos), np.asarray(neg)
    assert pos.sum() == 40 and neg.sum() == 216  # too few positives: filled with negatives
    assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0) and not np.any(pos & neg)
    labels[:400] = 2  # many positives (any label >= 1): capped at int(256 * 0.25)
    pos, neg = sample(jnp.asarray(labels), jax.random.key(1))
    assert int(pos.sum()) == 64 and int(neg.sum()) == 192
    # different keys give different subsets; the same key the same
    p2, _ = sample(jnp.asarray(labels), jax.random.key(2))
    p1, _ = sample(jnp.asarray(labels), jax.random.key(1))
    assert np.any(np.asarray(p2) != np.asarray(pos)) and np.array_equal(np.asarray(p1), np.asarray(pos))
    # uniform choice: every positive is picked about 64/400 of the time
    keys = jax.random.split(jax.random.key(3), 200)
    freq = np.asarray(jax.vmap(lambda k: sample(jnp.asarray(labels), k)[0])(keys)).mean(0)[:400]
    assert abs(freq.mean() - 64 / 400) < 1e-6 and freq.std() < 0.05
