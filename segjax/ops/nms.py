"""Static-shape non-maximum suppression, equal to `torchvision.ops.nms` / `batched_nms`.

Legend: N candidate boxes, K = `max_output` kept slots, T tile size.

torchvision's CPU kernel (`csrc/ops/cpu/nms_kernel.cpp`) sorts by decreasing score
(stable: equal scores keep their input order), then walks the sorted list: a box is
kept unless a kept, higher-ranked box overlaps it with IoU > threshold. The kept set
is unique given the order, so any evaluation order that respects it gives the same
set; we evaluate it in tiles:

  for each tile of T consecutive sorted boxes (a `while_loop`, stopping early once K
  boxes are kept):
    1. drop the candidates that overlap any box already kept (IoU against a (K, 4)
       buffer of kept boxes: K x T work);
    2. resolve the tile itself: x = cand & ~any_i<j(x_i & IoU_ij > t), iterated from
       x = cand to its fixed point. The equation is triangular, so its solution is
       unique and the k-th iterate is exact on the first k boxes: at most T rounds of
       T x T work, usually 2-3;
    3. append the tile's kept boxes to the buffer.

Work O(N K + N T) IoUs (plus the sort), sequential depth N / T tiles; memory O(K T + T^2).
For N = 5000, K = 1000, T = 128: 40 tiles and ~6 M IoUs. The IoU is computed with the
kernel's own float formula (inter / (area_i + area_j - inter)), and the threshold is
compared the way C++ compares a float IoU with a double threshold, so borderline
pairs are decided identically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.boxes import box_area, rounded


def _f32_threshold(t) -> jax.Array:
    """The float32 `t'` with `iou > t'` <=> `iou > t` for every float32 iou.

    The kernel compares a float IoU against a double threshold: for a Python float
    `t`, t' is the largest float32 <= t (float32(0.3) rounds up and would otherwise
    flip IoUs exactly equal to it). A traced threshold is just cast.
    """
    if isinstance(t, (int, float, np.floating)):
        f = np.float32(t)
        if float(f) > float(t):
            f = np.nextafter(f, np.float32(-np.inf))
        return jnp.float32(f)
    return jnp.asarray(t, jnp.float32)


def _pair_iou(a, area_a, b, area_b):
    """a (P, 4), b (Q, 4) with their areas -> (P, Q) IoU, torchvision's float order."""
    xx1 = jnp.maximum(a[:, None, 0], b[None, :, 0])
    yy1 = jnp.maximum(a[:, None, 1], b[None, :, 1])
    xx2 = jnp.minimum(a[:, None, 2], b[None, :, 2])
    yy2 = jnp.minimum(a[:, None, 3], b[None, :, 3])
    inter = rounded(jnp.maximum(xx2 - xx1, 0.0) * jnp.maximum(yy2 - yy1, 0.0))
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _nms_sorted(boxes, cand, classes, thr, max_output: int, tile: int):
    """Greedy NMS over boxes already in rank order.

    boxes (N, 4) float32, cand (N,) bool, classes (N,) int32 or None (suppress only
    within a class). Returns (pos (K,) int32 positions in the sorted order, count ()).
    """
    n = boxes.shape[0]
    n_tiles = max(1, -(-n // tile))
    pad = n_tiles * tile - n
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    cand = jnp.pad(cand, (0, pad))
    cls = jnp.pad(classes, (0, pad)) if classes is not None else jnp.zeros((n + pad,), jnp.int32)
    areas = box_area(boxes)
    tri = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # i ranks above j

    def body(state):
        t, count, kept_boxes, kept_area, kept_cls, kept_pos = state
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, t * tile, tile)  # noqa: E731
        bt, at, ct, ot = sl(boxes), sl(areas), sl(cls), sl(cand)
        # 1. suppression by boxes kept in earlier tiles (slots >= count are empty)
        live = jnp.arange(max_output) < count
        over = (_pair_iou(kept_boxes, kept_area, bt, at) > thr) & live[:, None] & (kept_cls[:, None] == ct[None, :])
        ot = ot & ~jnp.any(over, axis=0)
        # 2. the tile against itself, to the fixed point of the triangular recursion
        sup = (_pair_iou(bt, at, bt, at) > thr) & tri & (ct[:, None] == ct[None, :])

        def step(c):
            x, _ = c
            nx = ot & ~jnp.any(sup & x[:, None], axis=0)
            return nx, jnp.any(nx != x)

        x, _ = jax.lax.while_loop(lambda c: c[1], step, (ot, jnp.bool_(True)))
        # 3. append in rank order; slots past K are dropped
        slot = jnp.where(x, count + jnp.cumsum(x) - 1, max_output)
        put = lambda buf, v: buf.at[slot].set(v, mode="drop")  # noqa: E731
        kept_pos = put(kept_pos, t * tile + jnp.arange(tile, dtype=jnp.int32))
        state = (t + 1, count + jnp.sum(x, dtype=jnp.int32), put(kept_boxes, bt), put(kept_area, at),
                 put(kept_cls, ct), kept_pos)
        return state

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros((max_output, 4), boxes.dtype),
            jnp.zeros((max_output,), boxes.dtype), jnp.zeros((max_output,), jnp.int32),
            jnp.zeros((max_output,), jnp.int32))
    state = jax.lax.while_loop(lambda s: (s[0] < n_tiles) & (s[1] < max_output), body, init)
    return state[5], jnp.minimum(state[1], max_output)


def _nms(boxes, scores, classes, iou_threshold, max_output, valid, tile):
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4), got shape {boxes.shape}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be (N,) = {boxes.shape[:1]}, got shape {scores.shape}")
    if max_output < 1:
        raise ValueError(f"max_output must be >= 1, got {max_output}")
    n = boxes.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    # Descending, stable: valid boxes first, then by -score, ties by input index.
    order = jnp.lexsort((-scores.astype(jnp.float32), ~valid)).astype(jnp.int32)
    sorted_cls = None if classes is None else classes[order].astype(jnp.int32)
    pos, count = _nms_sorted(boxes[order].astype(jnp.float32), valid[order], sorted_cls,
                             _f32_threshold(iou_threshold), max_output, min(tile, max(n, 1)))
    keep_valid = jnp.arange(max_output) < count
    return jnp.where(keep_valid, order[jnp.minimum(pos, n - 1)], 0), keep_valid


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output", "tile"))
def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float,
    max_output: int,
    valid: jax.Array | None = None,
    tile: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Non-maximum suppression with a static output size.

    Args:
      boxes: (N, 4) XYXY.
      scores: (N,).
      iou_threshold: discard boxes with IoU > threshold against a kept, higher-scored
        box. Static.
      max_output: K, static number of output slots (at most the first K kept boxes).
      valid: (N,) bool or None; invalid (padding) boxes never keep nor suppress.
      tile: T, boxes resolved per step (see the module docstring). Static.
    Returns:
      (indices (K,) int32 into boxes, sorted by decreasing score (stable), 0 in empty
      slots; valid (K,) bool). `indices[valid]` equals `torchvision.ops.nms(...)[:K]`
      on the valid boxes.
    """
    return _nms(boxes, scores, None, iou_threshold, max_output, valid, tile)


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output", "method", "tile"))
def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    idxs: jax.Array,
    iou_threshold: float,
    max_output: int,
    valid: jax.Array | None = None,
    method: str = "offset",
    tile: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Per-category NMS, as `torchvision.ops.batched_nms`; returns as `nms`.

    idxs: (N,) int category of each box; boxes of different categories never
    suppress each other. `method`:
      "offset": torchvision's coordinate trick (its path for N <= 1000 on CPU): boxes
        are shifted by `idx * (max coordinate + 1)` (max over the valid boxes) and
        NMS-ed together, bit-identical to that path.
      "class": per-class IoU on the raw coordinates (torchvision's `_batched_nms_vanilla`,
        its path for N > 1000 on CPU), immune to the float rounding the shift causes
        at large offsets.
    """
    if method not in ("offset", "class"):
        raise ValueError(f"method must be 'offset' or 'class', got {method!r}")
    if method == "class":
        return _nms(boxes, scores, idxs, iou_threshold, max_output, valid, tile)
    ok = jnp.ones(boxes.shape[:1], bool) if valid is None else valid.astype(bool)
    max_coord = jnp.max(jnp.where(ok[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.any(ok), max_coord, 0.0).astype(boxes.dtype)
    offsets = idxs.astype(boxes.dtype) * (max_coord + jnp.asarray(1, boxes.dtype))
    return _nms(boxes + offsets[:, None], scores, None, iou_threshold, max_output, valid, tile)
