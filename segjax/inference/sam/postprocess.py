"""SAM mask post-processing in jnp: upscaling logits, stability score, mask boxes.

Legend: h/w low-res mask size (4x the embedding grid, 256 for SAM at 1024), S the
model input size, (hi, wi) the resized image inside the S x S input, (H, W) the
original image size.

`resize_bilinear` reproduces `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)` without antialiasing (what `Sam.postprocess_masks` calls): the
same source indices and weights to the bit (computed in float32 as torch's CPU kernel
does), the same order of the two 1-D passes. `upscale_masks` composes the reference's
two resizes per axis into one sparse operator (same weights, one rounding fewer). Both
are gathers of a few taps per output, linear in the output size (a dense resize
matrix, as `jax.image.resize` builds, would cost H*h per column).
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


def _dense(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of `linear_taps` (the float32 weights, exactly)."""
    i0, i1, w0, w1 = linear_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


@functools.lru_cache(maxsize=64)
def composed_taps(n_low: int, img_size: int, keep: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """One axis of `Sam.postprocess_masks` as a single sparse operator.

    Resize n_low -> img_size, keep the first `keep` samples, resize keep -> n_out: the
    product of the two linear maps, at most 3 taps per output. Returns (idx (n_out, K)
    int32, w (n_out, K) float32) with out[j] = sum_k w[j, k] * x[idx[j, k]].
    """
    m = _dense(n_low, img_size)[:keep]
    if keep != n_out:
        m = _dense(keep, n_out) @ m  # (n_out, n_low)
    k = int((m != 0).sum(axis=1).max())
    idx = np.zeros((n_out, k), np.int32)
    w = np.zeros((n_out, k), np.float32)
    for j, row in enumerate(m):
        nz = np.flatnonzero(row)
        idx[j, :len(nz)] = nz
        w[j, :len(nz)] = row[nz]
    return idx, w


def _gather_rows(x: jnp.ndarray, idx: np.ndarray, w: np.ndarray) -> jnp.ndarray:
    """(..., n, m) -> (..., n_out, m): out[j] = sum_k w[j, k] * x[idx[j, k]] (row gathers)."""
    out = None
    for k in range(idx.shape[1]):
        term = jnp.asarray(w[:, k])[:, None] * jnp.take(x, jnp.asarray(idx[:, k]), axis=-2)
        out = term if out is None else out + term
    return out


def _upscale_taps(low_shape: tuple[int, ...], img_size: int, input_size: tuple[int, int],
                  original_size: tuple[int, int]):
    """((idx, w) of the H axis, (idx, w) of the W axis) for `upscale_masks`."""
    hi, wi = input_size
    if not (0 < hi <= img_size and 0 < wi <= img_size):
        raise ValueError(f"input_size {input_size} must fit in the model input {img_size}")
    out_h, out_w = original_size
    return (composed_taps(low_shape[-2], img_size, hi, out_h),
            composed_taps(low_shape[-1], img_size, wi, out_w))


def upscale_masks_w(low_res: jnp.ndarray, img_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> jnp.ndarray:
    """The W pass of `upscale_masks`: (..., h, w) logits -> (..., h, W) float32."""
    _, taps_w = _upscale_taps(low_res.shape, img_size, input_size, original_size)
    x = jnp.swapaxes(low_res.astype(jnp.float32), -1, -2)
    return jnp.swapaxes(_gather_rows(x, *taps_w), -1, -2)


def upscale_masks_h(x: jnp.ndarray, img_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int], low_hw: tuple[int, int]) -> jnp.ndarray:
    """The H pass of `upscale_masks`: (..., h, W) from `upscale_masks_w` -> (..., H, W)
    float32; `low_hw` the low-res (h, w)."""
    taps_h, _ = _upscale_taps(low_hw, img_size, input_size, original_size)
    return _gather_rows(x, *taps_h)


def upscale_masks(low_res: jnp.ndarray, img_size: int, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> jnp.ndarray:
    """`Sam.postprocess_masks`: (..., h, w) logits -> (..., H, W) float32 logits.

    Bilinear to (S, S), crop to the resized image (hi, wi), bilinear to (H, W), each axis
    applied as the composition of the two torch resizes (`composed_taps`: the same
    interpolation weights, one rounding fewer, so values agree with the reference to
    float rounding, ~1e-7 relative). Both passes are row gathers (the W pass on the
    transposed low-res logits), which XLA:CPU runs ~2x faster than gathers along the
    minor axis.

    On XLA:CPU (jax 0.10) run the two passes as two programs (`upscale_masks_w`, then
    `upscale_masks_h` on its result, as `SamPredictor` and the mask generator do): in
    one program XLA fuses the W pass into the H pass's gathers (an optimization barrier
    between them is removed), 4x slower (64 masks at 800 x 1200: 74 ms, 17 ms as two).
    """
    x = upscale_masks_w(low_res, img_size, input_size, original_size)
    return upscale_masks_h(x, img_size, input_size, original_size, low_res.shape[-2:])


def stability_score(logits: jnp.ndarray, threshold: float, offset: float) -> jnp.ndarray:
    """(..., H, W) logits -> (...) float32: IoU of the masks thresholded at t + o and t - o.

    The high mask lies inside the low one, so IoU = count(high) / count(low); an empty
    low mask gives NaN (0/0), as the reference's integer division does.
    """
    if logits.shape[-1] >= 1 << 15:
        raise ValueError(f"width {logits.shape[-1]} too large for the packed row counts")
    # Both counts in one reduction: per row, high + (low << 15) (a row has < 2^15 pixels,
    # the reference counts rows in int16 too); two separate reductions of the same
    # input run ~20x slower on XLA:CPU (jax 0.10).
    packed = (logits > threshold + offset).astype(jnp.int32) + ((logits > threshold - offset).astype(jnp.int32) << 15)
    rows = jnp.sum(packed, axis=-1)  # (..., H)
    high = jnp.sum(rows & 0x7FFF, axis=-1)
    low = jnp.sum(rows >> 15, axis=-1)
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
