"""SAM mask post-processing in jnp: upscaling logits, stability score, mask boxes.

Legend: h/w low-res mask size (4x the embedding grid, 256 for SAM at 1024), S the
model input size, (hi, wi) the resized image inside the S x S input, (H, W) the
original image size.

`Sam.postprocess_masks` resizes with `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`; `upscale_masks` composes its two resizes per axis into one
sparse operator from torch's own taps (`segjax.ops.resample.linear_matrix`: the same
weights to the bit, one rounding fewer). Both passes are gathers of a few taps per
output, linear in the output size (a dense resize matrix, as `jax.image.resize`
builds, would cost H*h per column).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from segjax.ops.resample import linear_matrix


@functools.lru_cache(maxsize=64)
def composed_taps(n_low: int, img_size: int, keep: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """One axis of `Sam.postprocess_masks` as a single sparse operator.

    Resize n_low -> img_size, keep the first `keep` samples, resize keep -> n_out: the
    product of the two linear maps, at most 3 taps per output. Returns (idx (n_out, K)
    int32, w (n_out, K) float32) with out[j] = sum_k w[j, k] * x[idx[j, k]].
    """
    m = linear_matrix(n_low, img_size, dtype=np.float64)[:keep]  # the float32 weights, exactly
    if keep != n_out:
        m = linear_matrix(keep, n_out, dtype=np.float64) @ m  # (n_out, n_low)
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
    transposed low-res logits), which XLA:CPU runs faster than gathers along the
    minor axis.

    On XLA:CPU (seen with jax 0.10) run the two passes as two programs
    (`upscale_masks_w`, then `upscale_masks_h` on its result, as `SamPredictor` and the
    mask generator do): in one program XLA fuses the W pass into the H pass's gathers
    (an optimization barrier between them is removed), which is several times slower
    (figures in benchmarks/README.md).
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
    # input run much slower on XLA:CPU (seen with jax 0.10; benchmarks/README.md).
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
