"""Prompt simulation for SAM training (paper, appendix "Training algorithm"): a uniform
foreground point of a mask, a noisy box, and a point from the error region of a
prediction. Pure jnp, static shapes, randomness from `jax.random` keys only.

Legend: N objects (any leading shape), G the mask grid (G x G), S the model input side
(the S x S padded frame that SAM's prompts refer to), r = S / G input pixels per grid
pixel.

Coordinates: points are (x, y) in the S frame, in the pixel-index convention of
`Sam.predict_masks` (the prompt encoder adds +0.5 to reach the pixel centre, as the
official predictor): grid pixel (i, j) is the point ((j + 0.5) r - 0.5, (i + 0.5) r - 0.5),
the centre of the r x r input pixels it covers (with r = 1 exactly pixel (i, j)).
Boxes are XYXY in S-frame input pixels. Labels: 1 positive, 0 negative, -1 "not a
point" (no point could be sampled: the region is empty; its coordinates are (0, 0)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_points(index: jax.Array, grid: int, size: int) -> jax.Array:
    """Flat grid indices (...,) int (row-major over G x G) -> (..., 2) float32 (x, y)
    S-frame points at the centres of those grid pixels."""
    r = size / grid
    i, j = index // grid, index % grid
    return jnp.stack([(j + 0.5) * r - 0.5, (i + 0.5) * r - 0.5], axis=-1).astype(jnp.float32)


def valid_region(image_hw: jax.Array, grid: int, size: int) -> jax.Array:
    """The grid pixels whose centre lies inside the resized image (not the padding).

    image_hw: (..., 2) int (h, w) in S-frame pixels. Returns (..., G, G) bool.
    """
    r = size / grid
    centre = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * r  # continuous position of each centre
    hw = jnp.asarray(image_hw).astype(jnp.float32)
    rows = centre < hw[..., 0, None]
    cols = centre < hw[..., 1, None]
    return rows[..., :, None] & cols[..., None, :]


def sample_from_region(rng: jax.Array, region: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One grid pixel uniformly from each region.

    region: (..., G, G) bool. Returns (index (...,) int32 flat row-major, found (...,)
    bool: False where the region is empty (index 0 then)).
    """
    flat = region.reshape(*region.shape[:-2], -1)
    # uniform scores on the region, -1 off it: the arg-max is a uniform pick of the region
    u = jax.random.uniform(rng, flat.shape)
    index = jnp.argmax(jnp.where(flat, u, -1.0), axis=-1).astype(jnp.int32)
    found = jnp.any(flat, axis=-1)
    return jnp.where(found, index, 0), found


def sample_foreground_point(rng: jax.Array, masks: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """A point uniformly from each mask (round 1 of the recipe).

    masks: (..., G, G) bool. size: S.
    Returns: (coords (..., 2) float32 S-frame (x, y), labels (...,) int32: 1, or -1 at
      (0, 0) for an empty mask).
    """
    grid = masks.shape[-1]
    index, found = sample_from_region(rng, masks.astype(bool))
    coords = jnp.where(found[..., None], grid_points(index, grid, size), 0.0)
    return coords, jnp.where(found, 1, -1).astype(jnp.int32)


def sample_error_point(rng: jax.Array, pred: jax.Array, masks: jax.Array, image_hw: jax.Array,
                       size: int) -> tuple[jax.Array, jax.Array]:
    """A point uniformly from the error region of a prediction (rounds 2.. of the
    recipe): label 1 in a false negative (missed foreground), 0 in a false positive.
    Errors count only inside the resized image.

    pred, masks: (..., G, G) bool prediction and ground truth. image_hw: (..., 2) int
      (h, w) of the resized image in the S frame (broadcast against the leading shape).
    Returns: (coords (..., 2) float32 S-frame (x, y), labels (...,) int32: 1, 0, or -1
      at (0, 0) where prediction and ground truth agree everywhere inside the image).
    """
    # NOTE: where nothing is wrong the reference (sam2 `sample_random_points_from_errors`)
    # places a negative click on the background; here no point is added (label -1).
    grid = masks.shape[-1]
    pred, masks = pred.astype(bool), masks.astype(bool)
    inside = valid_region(image_hw, grid, size)
    fn = masks & ~pred & inside
    fp = pred & ~masks & inside
    index, found = sample_from_region(rng, fn | fp)
    is_fn = jnp.take_along_axis(fn.reshape(*fn.shape[:-2], -1), index[..., None], axis=-1)[..., 0]
    coords = jnp.where(found[..., None], grid_points(index, grid, size), 0.0)
    labels = jnp.where(found, is_fn.astype(jnp.int32), -1).astype(jnp.int32)
    return coords, labels


def noisy_boxes(rng: jax.Array, boxes: jax.Array, image_hw: jax.Array, std: float = 0.1,
                max_noise: float = 20.0) -> jax.Array:
    """Each box coordinate moved by Gaussian noise of std `std` x the box side along
    that axis (width for x, height for y), the noise clipped to +- max_noise pixels,
    then the box clipped to the image [0, w] x [0, h] (paper: "noise with standard
    deviation equal to 10% of the box sidelength, to a maximum of 20 pixels").

    boxes: (..., 4) float32 XYXY S-frame. image_hw: (..., 2) int (h, w).
    Returns: (..., 4) float32 XYXY; x0 <= x1 and y0 <= y1 kept (the corners are sorted).
    """
    # NOTE: sam2's `sample_box_points` draws uniform noise in +- min(0.1 side, 20); the
    # paper's wording (a standard deviation) is followed here.
    boxes = boxes.astype(jnp.float32)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    scale = std * jnp.stack([w, h, w, h], axis=-1)
    noise = jnp.clip(jax.random.normal(rng, boxes.shape) * scale, -max_noise, max_noise)
    out = boxes + noise
    hw = jnp.asarray(image_hw).astype(jnp.float32)
    upper = jnp.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], axis=-1)
    out = jnp.clip(out, 0.0, upper)
    x0, x1 = jnp.minimum(out[..., 0], out[..., 2]), jnp.maximum(out[..., 0], out[..., 2])
    y0, y1 = jnp.minimum(out[..., 1], out[..., 3]), jnp.maximum(out[..., 1], out[..., 3])
    return jnp.stack([x0, y0, x1, y1], axis=-1)
