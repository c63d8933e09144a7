"""Pasting per-RoI mask probabilities into the image, static shapes.

Legend: R RoIs, h/w mask size (28 x 28 in Mask R-CNN), H/W image size.

`paste_masks_in_image` reproduces torchvision's `roi_heads.paste_masks_in_image`:
  1. `expand_masks`: zero-pad the masks by `padding` on every side and grow the boxes
     about their centres by (w + 2 p) / w (float32), then truncate the box corners to
     integers (`.to(int64)` rounds toward zero);
  2. per box, resize the padded mask to (y2 - y1 + 1, x2 - x1 + 1) (each at least 1)
     with `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing);
  3. write it at (x1, y1), cropped to the image.
Step 2 varies in size per box, so here it is one separable linear map per box from
the padded mask to the whole image: rows A_y (H, h + 2p) and columns A_x (W, w + 2p)
hold the interpolation weights of the pixels the box covers and zeros elsewhere, and
`A_y mask A_x^T` is the pasted mask (two einsums). The weights are torch's linear
taps for a traced box length (`segjax.ops.resample.linear_taps_traced`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.resample import linear_taps_traced


def _paste_weights(lo, hi, out_size: int, in_size: int):
    """(out_size, in_size) weights that place a resized axis of length in_size at the
    integer box edges [lo, hi] (inclusive), cropped to [0, out_size)."""
    length = jnp.maximum(hi - lo + 1, 1)
    dst = jnp.arange(out_size, dtype=jnp.int32)
    inside = (dst >= jnp.maximum(lo, 0)) & (dst < jnp.minimum(hi + 1, out_size))
    i0, i1, w0, w1 = linear_taps_traced(in_size, length, dst - lo)  # dst - lo: index into the resized mask
    cols = jnp.arange(in_size, dtype=jnp.int32)
    wts = jnp.where(cols == i0[:, None], w0[:, None], 0.0) + jnp.where(cols == i1[:, None], w1[:, None], 0.0)
    return jnp.where(inside[:, None], wts, 0.0)  # (out_size, in_size)


def expand_boxes(boxes: jax.Array, scale) -> jax.Array:
    """Grow boxes (R, 4) XYXY about their centres by `scale` (torchvision expand_boxes)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)


@functools.partial(jax.jit, static_argnames=("image_hw", "padding"))
def paste_masks_in_image(
    masks: jax.Array, boxes: jax.Array, image_hw: tuple[int, int], padding: int = 1
) -> jax.Array:
    """Paste RoI masks into full-image masks, as torchvision's paste_masks_in_image.

    Args:
      masks: (R, h, w) float probabilities (or logits: the map is linear).
      boxes: (R, 4) XYXY in image pixels (the detections, in the frame of image_hw).
      image_hw: static (H, W) of the output.
      padding: zero border added to the masks before resizing (torchvision: 1).
    Returns:
      (R, H, W) float32.

    NOTE: a box that ends left of or above the image pastes nothing here; torchvision
    slices with the negative end index there (an error or a wrapped paste). Detections
    are clipped to the image before pasting, so this does not arise in Mask R-CNN.
    """
    if masks.ndim != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"masks must be (R, h, w) and boxes (R, 4), got {masks.shape}, {boxes.shape}")
    im_h, im_w = image_hw
    m = masks.shape[-1]
    # float(M + 2p) / M in Python, applied to a float32 tensor: float32 arithmetic
    scale = jnp.float32(np.float32(float(m + 2 * padding) / m))
    padded = jnp.pad(masks.astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
    ib = expand_boxes(boxes.astype(jnp.float32), scale).astype(jnp.int32)  # truncation toward 0
    ph, pw = padded.shape[1:]
    a_y = jax.vmap(lambda lo, hi: _paste_weights(lo, hi, im_h, ph))(ib[:, 1], ib[:, 3])  # (R, H, h+2p)
    a_x = jax.vmap(lambda lo, hi: _paste_weights(lo, hi, im_w, pw))(ib[:, 0], ib[:, 2])  # (R, W, w+2p)
    hp = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("rpq,rxq->rpx", padded, a_x, precision=hp)  # (R, h+2p, W): interpolate along x
    return jnp.einsum("ryp,rpx->ryx", a_y, rows, precision=hp)  # (R, H, W)
