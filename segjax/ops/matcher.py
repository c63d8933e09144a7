"""Proposal-to-ground-truth matching and balanced sampling, static shapes.

Legend: M ground-truth boxes (padded, with a valid mask), N proposals or anchors.

`match` is torchvision's `det_utils.Matcher`; `sample_balanced` is its
`BalancedPositiveNegativeSampler` with a JAX RNG. Both work on one image; `jax.vmap`
them over the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


@functools.partial(jax.jit, static_argnames=("allow_low_quality_matches",))
def match(
    iou: jax.Array,
    gt_valid: jax.Array | None,
    high: float,
    low: float,
    allow_low_quality_matches: bool = False,
) -> jax.Array:
    """Match each proposal to its best ground truth (torchvision's Matcher).

    Args:
      iou: (M, N) match quality, ground truth x proposals.
      gt_valid: (M,) bool or None; padded ground truth never matches.
      high, low: a proposal whose best quality is >= high matches; in [low, high) it
        is BETWEEN_THRESHOLDS (-2, ignored); below low it is BELOW_LOW_THRESHOLD
        (-1, background).
      allow_low_quality_matches: also match, for every valid ground truth, each
        proposal that attains that ground truth's highest quality (ties included, even
        when that quality is 0, exactly as torchvision), to the proposal's own best
        ground truth.
    Returns:
      (N,) int32: ground-truth index >= 0, or -1 / -2. With no valid ground truth
      every proposal is -1 (torchvision raises instead).
    """
    if iou.ndim != 2:
        raise ValueError(f"iou must be (M, N), got shape {iou.shape}")
    valid = jnp.ones(iou.shape[:1], bool) if gt_valid is None else gt_valid.astype(bool)
    q = jnp.where(valid[:, None], iou, -jnp.inf)
    matched_vals = jnp.max(q, axis=0)  # (N,)
    all_matches = jnp.argmax(q, axis=0).astype(jnp.int32)  # first maximum, as torch.max(dim)
    matches = jnp.where(matched_vals < low, BELOW_LOW_THRESHOLD,
                        jnp.where(matched_vals < high, BETWEEN_THRESHOLDS, all_matches))
    if allow_low_quality_matches:
        best_per_gt = jnp.max(q, axis=1, keepdims=True)  # (M, 1)
        restore = jnp.any((q == best_per_gt) & valid[:, None], axis=0)  # (N,)
        matches = jnp.where(restore, all_matches, matches)
    return matches.astype(jnp.int32)


def _random_subset(mask: jax.Array, k: jax.Array, rng: jax.Array) -> jax.Array:
    """A uniformly random subset of k of the True entries of mask (N,) -> (N,) bool."""
    u = jax.random.uniform(rng, mask.shape)
    key = jnp.where(mask, u, 2.0)  # candidates first, in random order
    rank = jnp.zeros(mask.shape, jnp.int32).at[jnp.argsort(key)].set(jnp.arange(mask.shape[0], dtype=jnp.int32))
    return mask & (rank < k)


@functools.partial(jax.jit, static_argnames=("num_samples", "positive_fraction"))
def sample_balanced(
    labels: jax.Array, num_samples: int, positive_fraction: float, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Balanced positive/negative sampling (torchvision BalancedPositiveNegativeSampler).

    Args:
      labels: (N,) int: >= 1 positive, 0 negative, -1 ignored.
      num_samples: samples per image (512 RoIs, 256 anchors). Static.
      positive_fraction: at most int(num_samples * positive_fraction) positives; the
        rest is filled with negatives, as available. Static.
      rng: PRNG key; the chosen subsets are uniform among the candidates.
    Returns:
      (pos_mask (N,) bool, neg_mask (N,) bool).
    """
    pos = labels >= 1
    neg = labels == 0
    num_pos = jnp.minimum(jnp.sum(pos), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
    k_pos, k_neg = jax.random.split(rng)
    return _random_subset(pos, num_pos, k_pos), _random_subset(neg, num_neg, k_neg)
