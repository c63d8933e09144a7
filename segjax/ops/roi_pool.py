"""RoIPool (Fast R-CNN max pooling) on NHWC features, static shapes.

Legend: B images, R RoIs per image, H/W feature size, C channels, h/w output size,
K_h/K_w the static bound on a bin's extent in feature pixels.

Semantics of torchvision's CPU kernel (`csrc/ops/cpu/roi_pool_kernel.cpp`):
box corners are rounded (half away from zero) after scaling, the RoI spans
`end - start + 1` pixels (at least 1), bin p covers rows
[floor(p * bin) + start, ceil((p + 1) * bin) + start) clipped to [0, H), each bin takes
the channel-wise max, and an empty bin gives 0. The gradient goes to the first
maximum in row-major scan order of the bin (torchvision's argmax), not split between
ties as `jnp.max`'s would be: the forward takes `argmax` and gathers that element.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from segjax.ops.boxes import div_exact
from segjax.ops.roi_align import _pair


def _round_half_away(x):
    """C `round`: halves away from zero (jnp.round rounds halves to even)."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _bin_edges(lo, hi, scale, size: int, n_out: int):
    """One RoI, one axis -> the bins' [b0, b1) feature rows (n_out,) int32, clipped to
    [0, size] (torchvision's roi_pool kernel)."""
    start = _round_half_away(lo * scale).astype(jnp.int32)
    end = _round_half_away(hi * scale).astype(jnp.int32)
    length = jnp.maximum(end - start + 1, 1)
    bin_size = div_exact(length.astype(jnp.float32), n_out)
    p = jnp.arange(n_out, dtype=jnp.float32)
    b0 = jnp.clip(jnp.floor(p * bin_size).astype(jnp.int32) + start, 0, size)
    b1 = jnp.clip(jnp.ceil((p + 1) * bin_size).astype(jnp.int32) + start, 0, size)
    return b0, b1


def _axis_bins(lo, hi, scale, size: int, n_out: int, k: int):
    """One RoI, one axis -> (idx (n_out, K) int32 in [0, size), mask (n_out, K) bool)."""
    b0, b1 = _bin_edges(lo, hi, scale, size, n_out)
    j = jnp.arange(k, dtype=jnp.int32)
    idx = b0[:, None] + j
    return jnp.minimum(idx, size - 1), idx < b1[:, None]


def _widest_bin(boxes, scale, size: int, n_out: int, axis: int) -> jax.Array:
    """boxes (N, 4) -> the largest b1 - b0 of their bins along `axis` (1: y, 0: x)."""
    b0, b1 = jax.vmap(lambda b: _bin_edges(b[axis], b[axis + 2], scale, size, n_out))(boxes)
    return jnp.max(b1 - b0, initial=0)


def default_max_bin(feature_hw: tuple[int, int], output_size) -> tuple[int, int]:
    """Bin-extent bound that covers RoIs no larger than the map (end - start + 1 <= H + 1).

    A bin of a RoI of L pixels covers at most ceil(L / h) + 1 rows; never more than H
    (bins are clipped to the map), so (H, W) covers every RoI.
    """
    oh, ow = _pair(output_size)
    h_, w_ = feature_hw
    return min(h_, math.ceil((h_ + 1) / oh) + 1), min(w_, math.ceil((w_ + 1) / ow) + 1)


def _pool_image(feat, boxes, scale, out_hw, k_hw):
    """feat (H, W, C), boxes (R, 4) -> (R, h, w, C)."""
    h_, w_, c = feat.shape
    iy, my = jax.vmap(lambda b: _axis_bins(b[1], b[3], scale, h_, out_hw[0], k_hw[0]))(boxes)  # (R, h, Kh)
    ix, mx = jax.vmap(lambda b: _axis_bins(b[0], b[2], scale, w_, out_hw[1], k_hw[1]))(boxes)  # (R, w, Kw)
    rows = iy[:, :, None, :, None] * w_ + ix[:, None, :, None, :]  # (R, h, w, Kh, Kw)
    mask = my[:, :, None, :, None] & mx[:, None, :, None, :]
    r = boxes.shape[0]
    rows = rows.reshape(r, out_hw[0], out_hw[1], -1)  # (R, h, w, Kh*Kw), row-major scan order
    mask = mask.reshape(rows.shape)
    vals = jnp.take(feat.reshape(h_ * w_, c), rows, axis=0, mode="clip")  # (R, h, w, Kh*Kw, C)
    vals = jnp.where(mask[..., None], vals, -jnp.inf)
    first = jnp.argmax(jax.lax.stop_gradient(vals), axis=3)  # (R, h, w, C): first maximum
    best = jnp.take_along_axis(vals, first[:, :, :, None, :], axis=3)[:, :, :, 0]
    empty = ~jnp.any(mask, axis=3)
    return jnp.where(empty[..., None], 0.0, best)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale", "max_bin"))
def roi_pool(
    features: jax.Array, boxes: jax.Array, output_size, spatial_scale: float = 1.0, max_bin=None
) -> jax.Array:
    """RoIPool, as `torchvision.ops.roi_pool`, on NHWC features.

    Args:
      features: (B, H, W, C) float.
      boxes: (B, R, 4) XYXY in input pixels; RoI r of image b pools from features[b].
      output_size: h or (h, w), static.
      spatial_scale: feature px per input px, static.
      max_bin: opt-in static bound (K_h, K_w) (or an int) on the feature pixels one
        bin spans: the gather reads K_h x K_w pixels per bin, so a smaller bound is
        faster, but NOT exact: larger bins are cropped to their first K rows/columns.
        Default None: exact for every box (`default_max_bin` when every bin of the call
        fits it, else the whole map's (H, W), chosen at run time by `lax.cond`).
    Returns:
      (B, R, h, w, C) in features.dtype. No gradient flows into boxes.
    """
    if features.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"need features (B, H, W, C) and boxes (B, R, 4), got {features.shape}, {boxes.shape}")
    out_hw = _pair(output_size)
    boxes = jax.lax.stop_gradient(boxes).astype(jnp.float32)
    scale = jnp.float32(spatial_scale)

    def pool(k_hw, f, b):
        return jax.vmap(functools.partial(_pool_image, scale=scale, out_hw=out_hw, k_hw=k_hw))(f, b)

    if max_bin is not None:
        k_hw = (max_bin, max_bin) if isinstance(max_bin, int) else tuple(max_bin)
        return pool(k_hw, features, boxes).astype(features.dtype)
    fast, full = default_max_bin(features.shape[1:3], out_hw), tuple(features.shape[1:3])
    if fast == full:
        return pool(full, features, boxes).astype(features.dtype)
    # RoIs larger than the map can have bins wider than `fast`: then the full bound
    flat = boxes.reshape(-1, 4)
    fits = ((_widest_bin(flat, scale, full[0], out_hw[0], axis=1) <= fast[0])
            & (_widest_bin(flat, scale, full[1], out_hw[1], axis=0) <= fast[1]))
    out = jax.lax.cond(fits, functools.partial(pool, fast), functools.partial(pool, full), features, boxes)
    return out.astype(features.dtype)
