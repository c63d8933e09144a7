"""SAM mask post-processing in jnp: upscaling logits, stability score, mask boxes.

Legend: h/w low-res mask size (4x the embedding grid, 256 for SAM at 1024), S the
model input size, (hi, wi) the resized image inside the S x S input, (H, W) the
original image size.

`resize_bilinear` reproduces `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)` without antialiasing (what `Sam.postprocess_masks` calls) to
float rounding: the same source indices and weights, computed in float32 as torch's
CPU kernel does, and the same order of the two 1-D passes. It is a gather of two
taps per axis, so its cost is linear in the output size (a dense resize matrix, as
`jax.image.resize` builds, would cost H*h per column).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's `align_corners=False` linear resize.

    Returns (i0, i1, w0, w1), each (out_size,): out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]].
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    if in_size == out_size:
        i = np.arange(out_size, dtype=np.int32)
        return i, i, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    # torch's kernel evaluates scale * (j + 0.5) - 0.5 as one fused multiply-add (one
    # rounding); float64 holds the product exactly, so this is the same float32 value
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))  # torch clamps negative source positions to 0
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    return i0, i1, (f32(1.0) - w1).astype(f32), w1


def _resize_axis(x: jnp.ndarray, out_size: int, axis: int, keep: int | None = None) -> jnp.ndarray:
    """Linear resize of `axis` to `out_size`, evaluated only at the first `keep` outputs."""
    i0, i1, w0, w1 = (a[:keep] for a in linear_taps(x.shape[axis], out_size))
    shape = [1] * x.ndim
    shape[axis] = len(i0)
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    return w0 * jnp.take(x, jnp.asarray(i0), axis=axis) + w1 * jnp.take(x, jnp.asarray(i1), axis=axis)


def resize_bilinear(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """(..., h, w) -> (..., H, W): torch bilinear, align_corners=False, no antialias.

    W pass first, then H: torch's kernel computes h0 * (w0 * x00 + w1 * x01) + h1 * (...).
    """
    out_h, out_w = out_hw
    return _resize_axis(_resize_axis(x, out_w, -1), out_h, -2)


def upscale_masks(low_res: jnp.ndarray, img_size: int, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> jnp.ndarray:
    """`Sam.postprocess_masks`: (..., h, w) logits -> (..., H, W) float32 logits.

    Bilinear to (S, S), crop to the resized image (hi, wi), bilinear to (H, W). The first
    resize is evaluated only at the rows/columns the crop keeps (the same values).
    """
    hi, wi = input_size
    if not (0 < hi <= img_size and 0 < wi <= img_size):
        raise ValueError(f"input_size {input_size} must fit in the model input {img_size}")
    x = low_res.astype(jnp.float32)
    x = _resize_axis(_resize_axis(x, img_size, -1, keep=wi), img_size, -2, keep=hi)  # (..., hi, wi)
    if (hi, wi) == tuple(original_size):
        return x
    return resize_bilinear(x, tuple(original_size))


def stability_score(logits: jnp.ndarray, threshold: float, offset: float) -> jnp.ndarray:
    """(..., H, W) logits -> (...) float32: IoU of the masks thresholded at t + o and t - o.

    The high mask lies inside the low one, so IoU = count(high) / count(low); an empty
    low mask gives NaN (0/0), as the reference's integer division does.
    """
    high = jnp.sum(logits > threshold + offset, axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum(logits > threshold - offset, axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def mask_boxes(masks: jnp.ndarray) -> jnp.ndarray:
    """(..., H, W) bool -> (..., 4) int32 XYXY with inclusive max corner; [0,0,0,0] if empty.

    `segment_anything.utils.amg.batched_mask_to_box`: x1/y1 are the last set column/row
    (not one past it).
    """
    h, w = masks.shape[-2:]
    rows = jnp.any(masks, axis=-1)  # (..., H)
    cols = jnp.any(masks, axis=-2)  # (..., W)
    ys = jnp.arange(h, dtype=jnp.int32)
    xs = jnp.arange(w, dtype=jnp.int32)
    bottom = jnp.max(jnp.where(rows, ys, 0), axis=-1)
    top = jnp.min(jnp.where(rows, ys, h), axis=-1)
    right = jnp.max(jnp.where(cols, xs, 0), axis=-1)
    left = jnp.min(jnp.where(cols, xs, w), axis=-1)
    empty = (right < left) | (bottom < top)
    boxes = jnp.stack([left, top, right, bottom], axis=-1)
    return jnp.where(empty[..., None], 0, boxes)
