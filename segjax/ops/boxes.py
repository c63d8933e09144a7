"""Box arithmetic: areas, pairwise IoU, box coding, clipping, small-box masks.

Conventions (the whole library's, written down here once):
  * boxes are XYXY `(x1, y1, x2, y2)` in absolute input pixels, float32;
  * widths are `x2 - x1` (no `+ 1`), as current torchvision;
  * sizes are `(H, W)`; points are `(x, y)`; arrays are NHWC.

Legend: N, M box counts; `...` any leading batch axes (the functions broadcast).

Every function reproduces the torchvision op it is named after
(`torchvision.ops.box_area / box_iou / clip_boxes_to_image / remove_small_boxes` and
`torchvision.models.detection._utils.BoxCoder`), with the same order of float
operations where that decides the last bit; instead of dropping boxes (a dynamic
shape) they return masks.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# torchvision's BoxCoder default: exp() of larger log-scale deltas would overflow.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def div_exact(x: jax.Array, c) -> jax.Array:
    """x / c as an IEEE division, for c a constant or a (broadcast) scalar.

    XLA rewrites a division by a constant or a broadcast scalar into a multiplication
    by its rounded reciprocal (and folds chains of constant factors), which moves
    results by an ulp or two; the torchvision kernels divide. A divisor that is an
    elementwise select on x (the same value, or NaN where x is NaN: the result is
    unchanged) is neither, so the division stays, and coordinates (and the floor/ceil
    and threshold decisions made on them) match the reference bit for bit.
    """
    x = jnp.asarray(x)
    return x / jnp.where(x != x, jnp.nan, jnp.asarray(c, x.dtype))


def rounded(x: jax.Array) -> jax.Array:
    """x, rounded to its dtype before it is added to anything.

    XLA:CPU contracts `a * b + c` into a fused multiply-add (one rounding), while the
    references round the product first; the ulp of difference moves a sampling
    coordinate by ~1e-5 px on a 200 px map, or flips a floor or a threshold. A select
    between the multiply and the add blocks the contraction (an optimization barrier
    does not: it is expanded before fusion). Identity on every value, NaN included.
    """
    return jnp.where(x == x, x, jnp.nan)


def box_area(boxes: jax.Array) -> jax.Array:
    """boxes (..., 4) XYXY -> (...) area `(x2 - x1) * (y2 - y1)` (negative if degenerate)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairwise intersection and union areas.

    a: (..., N, 4), b: (..., M, 4) XYXY -> (inter (..., N, M), union (..., N, M)).
    """
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., N, M, 2)
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = rounded(wh[..., 0] * wh[..., 1])
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter, union


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU, as `torchvision.ops.box_iou`.

    a: (..., N, 4), b: (..., M, 4) XYXY -> (..., N, M) float. 0/0 (two empty boxes)
    gives NaN, as in torchvision.
    """
    inter, union = box_inter_union(a, b)
    return inter / union


def encode_boxes(
    matched_gt: jax.Array, proposals: jax.Array, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jax.Array:
    """Regression targets of `matched_gt` relative to `proposals` (BoxCoder.encode).

    matched_gt: (..., 4) XYXY reference (ground-truth) boxes; proposals: (..., 4) XYXY.
    weights: (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    Returns (..., 4) deltas (dx, dy, dw, dh).
    """
    wx, wy, ww, wh = (jnp.asarray(w, proposals.dtype) for w in weights)
    ex_w = proposals[..., 2] - proposals[..., 0]
    ex_h = proposals[..., 3] - proposals[..., 1]
    ex_cx = proposals[..., 0] + 0.5 * ex_w
    ex_cy = proposals[..., 1] + 0.5 * ex_h
    gt_w = matched_gt[..., 2] - matched_gt[..., 0]
    gt_h = matched_gt[..., 3] - matched_gt[..., 1]
    gt_cx = matched_gt[..., 0] + 0.5 * gt_w
    gt_cy = matched_gt[..., 1] + 0.5 * gt_h
    # same association as torchvision: (w * diff) / size
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: jax.Array,
    boxes: jax.Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = BBOX_XFORM_CLIP,
) -> jax.Array:
    """Apply regression deltas to boxes (BoxCoder.decode_single).

    deltas: (..., 4) (dx, dy, dw, dh); boxes: (..., 4) XYXY, broadcastable against
    deltas (per-class deltas (N, K, 4) with boxes (N, 1, 4)). dw, dh are clamped at
    `clip` from above before `exp`. Returns (..., 4) XYXY.
    """
    boxes = boxes.astype(deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = div_exact(deltas[..., 0], wx)
    dy = div_exact(deltas[..., 1], wy)
    dw = jnp.minimum(div_exact(deltas[..., 2], ww), clip)
    dh = jnp.minimum(div_exact(deltas[..., 3], wh), clip)
    pred_cx = rounded(dx * widths) + ctr_x
    pred_cy = rounded(dy * heights) + ctr_y
    half_w = rounded(0.5 * (jnp.exp(dw) * widths))
    half_h = rounded(0.5 * (jnp.exp(dh) * heights))
    return jnp.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h], axis=-1)


def clip_boxes(boxes: jax.Array, hw) -> jax.Array:
    """Clamp boxes into an image, as `torchvision.ops.clip_boxes_to_image`.

    boxes: (..., 4) XYXY; hw: (H, W) Python ints, or an array broadcastable to (..., 2)
    (per-image sizes, e.g. `image_hw[:, None]` against (B, R, 4) boxes).
    x is clamped to [0, W], y to [0, H]. Returns (..., 4).
    """
    hw = jnp.asarray(hw, boxes.dtype)
    h, w = hw[..., 0], hw[..., 1]
    x = jnp.clip(boxes[..., 0::2], 0.0, w[..., None])
    y = jnp.clip(boxes[..., 1::2], 0.0, h[..., None])
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def remove_small_boxes(boxes: jax.Array, min_size: float) -> jax.Array:
    """Keep mask of `torchvision.ops.remove_small_boxes`: both sides `>= min_size`.

    boxes: (..., 4) XYXY -> (...) bool, True = kept (torchvision returns the indices
    of the True entries; a static shape needs the mask).
    """
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(..., 4) XYXY -> (..., 4) (cx, cy, w, h)."""
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(..., 4) (cx, cy, w, h) -> (..., 4) XYXY."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
