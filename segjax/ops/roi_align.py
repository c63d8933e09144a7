"""RoIAlign (He et al. 2017, Mask R-CNN) and its FPN multi-level form, static shapes.

Legend: B images, R RoIs per image, H/W feature size, C channels, h/w output size,
S samples laid out per bin and axis, T taps (feature rows or columns) per bin and axis.

Semantics are torchvision's CPU kernel (`torchvision/csrc/ops/cpu/roi_align_kernel.cpp`,
`roi_align_common.h`), bit for bit where the float order allows:
  * box edges scale as `x * spatial_scale - offset`, offset 0.5 if `aligned` else 0;
    with `aligned=False` the RoI size is clamped to >= 1 ("malformed RoIs are 1x1");
  * each of the h x w bins averages g_y x g_x bilinear samples at
    `start + p * bin + (i + 0.5) * bin / g`; g = `sampling_ratio` if > 0, else adaptive
    `ceil(roi_size / output_size)` per RoI and axis (g <= 0: no samples, the bin is 0);
  * a sample with y < -1 or y > H (likewise x) contributes zero; y in [-1, 0] reads
    row 0; y >= H - 1 reads row H - 1 only;
  * the sum is divided by the full count g_y * g_x (the zero samples included).

Taps. The bilinear weight of a sample factorises into a y part and an x part, and so
does the border rule, so everything is built per axis: for every RoI and output row p,
T feature rows with weights that already hold the 1 / g_y of the average (likewise
columns). Three static layouts of a bin's samples:
  * fixed `sampling_ratio` S: its S samples, each with its two neighbours: T = 2 S.
  * adaptive (the default, exact for every box): g = ceil(bin) is data dependent and
    unbounded (a RoI may be many times the map), but only samples in [-1, H] count, and
    when g >= 2 consecutive samples are bin / ceil(bin) >= 1/2 px apart, so that a bin
    with g > H + 2 has at most H + 2 of them. A window of S = H + 2 + 2m consecutive
    samples, located per bin to start m samples before the first one at y >= -1 (m
    absorbs the rounding of that estimate), therefore holds every sample that counts.
    When every RoI of a call has g <= ceil(H / h) (RoIs no larger than the map), a
    short window from sample 0, checked at run time, holds them all and is used instead
    (`lax.cond`: the long window costs only when some RoI needs it). The samples'
    weights are summed per feature row: T = H taps, the consecutive rows r0, r0 + 1, ...
    that the bin touches, of which only the first n <= min(H, ceil(bin) + 2) can be
    nonzero (n is returned per bin).
  * adaptive with `max_samples` S (opt-in): S samples laid out, spread evenly over the
    bin when g > S (then inexact), T = 2 S.
Locating the long window needs float32 sample coordinates that resolve the sample
spacing: it is exact for box coordinates below ~2^20 feature pixels in magnitude
(tested to 4e6; far beyond, torchvision's own int grid count overflows).

Two contractions of the taps with the features:
  * `impl="gather"` (the default): accumulates, one tap at a time, weight x (the tap's
    C-vector of the (H*W, C) feature map); cost ~ R h w T_y T_x C, no (H, W)-sized
    work per RoI. In the adaptive layout the loop runs over the n_y x n_x taps that can
    be nonzero (the largest n over the batch, a run-time trip count), so its cost follows
    the largest bin of the batch rather than the map size.
  * `impl="matmul"`: densifies the taps into per-RoI interpolation matrices
    A_y (h, H) and A_x (w, W) (`roi_align_weights`) and contracts `A_y F A_x^T` with
    two einsums; cost ~ R h H W C, independent of the layout, memory R h W C per image.
    Made of matmuls only (its backward too), which is what TPUs (and bitwise-
    reproducible GPU backward passes) want.

Gradients: w.r.t. `features` only (boxes pass through `stop_gradient`, as
torchvision's roi_align has no box gradient). impl="gather" has a custom VJP whose
backward scatter-adds weight x cotangent into the same taps, one tap at a time (a
deterministic order on CPU; scatter-add on GPU may use atomics, so use impl="matmul"
where bitwise-reproducible gradients matter); JAX differentiates impl="matmul" into
matmuls. Both equal torchvision's backward kernel up to float summation order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.boxes import div_exact, rounded

IMPLS = ("gather", "matmul")
DEFAULT_IMPL = "gather"  # the faster on CPU (benchmarks/roi_align.py); "matmul" for TPUs
# Samples of margin on each side of the adaptive window: its start is estimated from
# the float sample coordinates, which may be off by a few samples' rounding.
_MARGIN = 4


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"output_size must be a positive int or (h, w), got {v}")
    return v


class _Grid(NamedTuple):
    """Static sample layout along one axis (see the module docstring).

    kind: "fixed" (sampling_ratio > 0), "capped" (adaptive, `max_samples`) or "exact"
    (adaptive, a located window). s: samples laid out per bin. taps: T per bin.
    """

    kind: str
    s: int
    taps: int


def _grids(sampling_ratio: int, max_samples, feature_hw: tuple[int, int]) -> tuple[_Grid, _Grid]:
    """(y grid, x grid) for features of (the largest) size feature_hw."""
    if sampling_ratio > 0:
        return (_Grid("fixed", sampling_ratio, 2 * sampling_ratio),) * 2
    if max_samples is not None:
        m = (max_samples, max_samples) if isinstance(max_samples, int) else tuple(max_samples)
        if len(m) != 2 or min(m) < 1:
            raise ValueError(f"max_samples must be a positive int or (S_y, S_x), got {max_samples}")
        return _Grid("capped", m[0], 2 * m[0]), _Grid("capped", m[1], 2 * m[1])
    return tuple(_Grid("exact", n + 2 + 2 * _MARGIN, n) for n in feature_hw)


def _bins(lo, hi, n_out: int, aligned: bool):
    """RoI start and bin size along one axis (feature px), as the kernel computes them."""
    offset = 0.5 if aligned else 0.0
    start = lo - offset
    roi = (hi - offset) - start
    if not aligned:
        roi = jnp.maximum(roi, 1.0)  # "force malformed RoIs to be 1x1"
    return start, div_exact(roi, n_out)


def _scaled(box, scale):
    return rounded(box.astype(jnp.float32) * scale)  # rounded before `- offset` (no FMA)


def _exact_window(fn, grids, boxes, scale, feature_hw, out_hw, aligned: bool):
    """fn(grids), computed with a short adaptive window when it holds every sample.

    The window of the "exact" layout must hold H + 2 + 2m samples for RoIs many times
    the map, but a bin whose count g = ceil(bin) fits a window of S samples is laid
    out whole from sample 0 (exactly, no estimate involved). RoIs no larger than the
    map have g <= ceil(H / h); when every RoI of the call is within that (checked at
    run time), fn runs with that window instead (a `lax.cond`: one branch executes).
    boxes (..., 4) input px; scale broadcastable to boxes[..., 0].
    """
    if grids[0].kind != "exact":
        return fn(grids)
    fit = [_Grid("exact", min(gr.s, -(-n // o) + 1), gr.taps) for gr, n, o in zip(grids, feature_hw, out_hw)]
    if tuple(fit) == tuple(grids):
        return fn(grids)
    box = _scaled(boxes, jnp.asarray(scale, jnp.float32)[..., None])
    fits = jnp.bool_(True)
    for gr, (lo, hi), n_out in zip(fit, ((1, 3), (0, 2)), out_hw):
        count = jnp.ceil(_bins(box[..., lo], box[..., hi], n_out, aligned)[1])
        # one sample of slack so that the check never depends on a rounding (NaN: fits)
        fits = fits & jnp.all(~(count > gr.s - 1))
    return jax.lax.cond(fits, lambda: fn(tuple(fit)), lambda: fn(grids))


def _axis_samples(lo, hi, size, n_out: int, grid: _Grid, aligned: bool):
    """The S laid-out samples of every bin of one RoI along one axis.

    lo, hi: () float32 box edges in feature pixels (already times spatial_scale).
    size: () int32 or int, the feature extent along this axis.
    Returns low, high (n_out, S) int32 in [0, size): each sample's two neighbours;
    w_low, w_high (n_out, S) float32: their weights, zero for a sample that does not
    count, with the 1 / g of the average; valid (n_out, S) bool: the sample counts.
    """
    f32 = jnp.float32
    start, bin_size = _bins(lo, hi, n_out, aligned)
    p = jnp.arange(n_out, dtype=f32)
    bin_start = start + rounded(p * bin_size)  # (n_out,), the kernel's association
    i = jnp.broadcast_to(jnp.arange(grid.s, dtype=jnp.int32), (n_out, grid.s))
    if grid.kind == "fixed":
        count = jnp.asarray(float(grid.s), f32)
        used = jnp.ones((n_out, grid.s), bool)
    elif grid.kind == "capped":
        # NOTE: torchvision takes ceil(roi / n_out) samples; a RoI that needs more than
        # `max_samples` gets `max_samples` evenly spread samples instead.
        count = jnp.clip(jnp.ceil(bin_size), 0.0, float(grid.s))
        used = i.astype(f32) < count
    else:
        count = jnp.ceil(bin_size)  # torchvision's grid; NaN for a NaN box
        has = count >= 1.0
        g = jnp.where(has, jnp.minimum(count, 2.0**30), 0.0).astype(jnp.int32)
        # first sample at y >= -1: bin_start + (i + 0.5) * bin / g >= -1 (an estimate)
        step = bin_size / jnp.where(has, count, 1.0)
        first = jnp.ceil((-1.0 - bin_start) / step - 0.5)
        i0 = jnp.clip(first - _MARGIN, 0.0, jnp.maximum(g - grid.s, 0).astype(f32))
        i = jnp.where(has & (i0 == i0), i0, 0.0).astype(jnp.int32)[:, None] + i
        used = i < g
    den = jnp.where(count >= 1.0, count, 1.0)  # also for a NaN count (a NaN box pools 0)
    # same association as the kernel: (start + p * bin) + ((i + .5) * bin) / g
    y = bin_start[:, None] + rounded(div_exact((i.astype(f32) + 0.5) * bin_size, den))  # (n_out, S)
    size_f = jnp.asarray(size, f32)
    size_i = jnp.asarray(size, jnp.int32)
    # written as "in range" so that NaN coordinates count as outside, as in the kernel
    valid = used & (y >= -1.0) & (y <= size_f)
    yc = jnp.where(valid, jnp.maximum(y, 0.0), 0.0)
    low = jnp.floor(yc).astype(jnp.int32)  # yc >= 0: floor == the kernel's (int) cast
    edge = low >= size_i - 1
    low = jnp.where(edge, size_i - 1, low)
    high = jnp.where(edge, size_i - 1, low + 1)
    yc = jnp.where(edge, low.astype(f32), yc)
    frac = yc - low.astype(f32)
    w_low = div_exact(jnp.where(valid, 1.0 - frac, 0.0), den)
    w_high = div_exact(jnp.where(valid, frac, 0.0), den)
    return low, high, w_low, w_high, valid


def _sum_rows(low, high, w_low, w_high, n_rows: int):
    """(n_out, n_rows) float32: row j holds the summed weights of the taps at row j.
    low, high (n_out, S) in [0, n_rows) (a tap outside is clipped; give it weight 0)."""
    n_out = low.shape[0]
    p = jnp.broadcast_to(jnp.arange(n_out)[:, None], (n_out, 2 * low.shape[1]))
    rows = jnp.clip(jnp.concatenate([low, high], 1), 0, n_rows - 1)
    return jnp.zeros((n_out, n_rows), jnp.float32).at[p, rows].add(jnp.concatenate([w_low, w_high], 1))


def _axis_taps(lo, hi, size, n_out: int, grid: _Grid, aligned: bool):
    """Taps of one RoI along one axis.

    Returns idx (n_out, T) int32 in [0, size), wts (n_out, T) float32 and n (n_out,)
    int32: taps n.. of a bin have weight zero.
    """
    low, high, w_low, w_high, valid = _axis_samples(lo, hi, size, n_out, grid, aligned)
    if grid.kind != "exact":  # the (low, high) neighbours of every sample
        idx = jnp.stack([low, high], axis=-1).reshape(n_out, grid.taps)
        wts = jnp.stack([w_low, w_high], axis=-1).reshape(n_out, grid.taps)
        return idx, wts, jnp.full((n_out,), grid.taps, jnp.int32)
    # the rows r0 .. r1 that the bin touches, weights summed per row
    r0 = jnp.min(jnp.where(valid, low, jnp.iinfo(jnp.int32).max), axis=1)
    r1 = jnp.max(jnp.where(valid, high, -1), axis=1)
    n = jnp.maximum(r1 - r0 + 1, 0)
    r0 = jnp.where(n > 0, r0, 0)
    wts = _sum_rows(low - r0[:, None], high - r0[:, None], w_low, w_high, grid.taps)
    idx = jnp.minimum(r0[:, None] + jnp.arange(grid.taps, dtype=jnp.int32), jnp.asarray(size, jnp.int32) - 1)
    return idx, wts, n


def _axis_dense(lo, hi, size: int, n_out: int, grid: _Grid, aligned: bool):
    """(n_out, size) float32 interpolation matrix of one RoI along one axis."""
    if grid.kind == "exact":
        low, high, w_low, w_high, _ = _axis_samples(lo, hi, size, n_out, grid, aligned)
        return _sum_rows(low, high, w_low, w_high, size)
    idx, wts, _ = _axis_taps(lo, hi, size, n_out, grid, aligned)
    # a sum of products with a one-hot (not an einsum: no reduced-precision passes on TPU)
    return jnp.sum(wts[..., None] * jax.nn.one_hot(idx, size, dtype=jnp.float32), axis=-2)


def _taps(boxes, scale, hw, out_hw, grids, aligned):
    """Vmapped over images and RoIs: boxes (B, R, 4), scale (B, R), hw (B, R, 2) ->
    iy, wy (B, R, h, T_y), ny (B, R, h), ix, wx (B, R, w, T_x), nx (B, R, w)."""

    def one(box, s, size):
        box = _scaled(box, s)
        return (*_axis_taps(box[1], box[3], size[0], out_hw[0], grids[0], aligned),
                *_axis_taps(box[0], box[2], size[1], out_hw[1], grids[1], aligned))

    return jax.vmap(jax.vmap(one))(boxes, scale, hw)


def roi_align_weights(boxes: jax.Array, feature_hw: tuple[int, int], output_size, spatial_scale: float = 1.0,
                      sampling_ratio: int = -1, aligned: bool = False, max_samples=None):
    """Separable RoIAlign weights: `roi_align(F, box)[p, q] = sum A_y[p, Y] F[Y, X] A_x[q, X]`.

    The same taps as `roi_align` (torchvision's sample positions, border rule and
    average), summed into one matrix per axis; exact for every box in adaptive mode.
    boxes: (..., 4) XYXY in input pixels; feature_hw: static (H, W); the other
    arguments as `roi_align`. Returns (A_y (..., h, H), A_x (..., w, W)) float32.
    """
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be (..., 4), got shape {boxes.shape}")
    out_hw = _pair(output_size)
    h_, w_ = feature_hw
    boxes = jax.lax.stop_gradient(boxes)
    scale = jnp.float32(spatial_scale)

    def dense(grids):
        def one(box):
            box = _scaled(box, scale)
            return (_axis_dense(box[1], box[3], h_, out_hw[0], grids[0], aligned),
                    _axis_dense(box[0], box[2], w_, out_hw[1], grids[1], aligned))

        return jax.vmap(one)(boxes.reshape(-1, 4))

    grids = _grids(sampling_ratio, max_samples, (h_, w_))
    a_y, a_x = _exact_window(dense, grids, boxes, scale, (h_, w_), out_hw, aligned)
    lead = boxes.shape[:-1]
    return a_y.reshape(*lead, *a_y.shape[1:]), a_x.reshape(*lead, *a_x.shape[1:])


def _tap(t, n_x, iy, wy, ix, wx, row_start, row_len):
    """Tap t = j * n_x + k of every bin: feature rows (R, h, w) int32, weights (R, h, w)."""
    j, k = t // n_x, t % n_x
    ty = jax.lax.dynamic_index_in_dim(iy, j, axis=2, keepdims=False)  # (R, h)
    tx = jax.lax.dynamic_index_in_dim(ix, k, axis=2, keepdims=False)  # (R, w)
    rows = row_start[:, None, None] + ty[:, :, None] * row_len[:, None, None] + tx[:, None, :]
    wts = (jax.lax.dynamic_index_in_dim(wy, j, axis=2, keepdims=False)[:, :, None]
           * jax.lax.dynamic_index_in_dim(wx, k, axis=2, keepdims=False)[:, None, :])
    return rows, wts


def _trip(dynamic: bool, iy, ix, counts):
    """(taps per row of the loop, number of taps): static T_y T_x, or the run-time
    counts (n_y, n_x) of the adaptive layout."""
    if dynamic:
        return counts[1], counts[0] * counts[1]
    return ix.shape[-1], iy.shape[-1] * ix.shape[-1]


_UNROLL = 16  # taps per step of the forward loop


def _gather_forward(dynamic, flat, iy, wy, ix, wx, row_start, row_len, counts):
    """out (R, h, w, C) = sum over the taps of weight * flat[row].

    One tap at a time: each step gathers whole C-vectors with bin-invariant indices,
    which XLA vectorises over C (a single gather of all taps followed by a reduction
    is much slower on CPU). The loop is unrolled by 16 so that the (R, h, w, C)
    accumulator is read and written once per 16 taps; a run-time tap count is rounded
    up to a multiple of 16 with zero-weight taps.
    """
    n_x, n = _trip(dynamic, iy, ix, counts)

    def add(t, acc, live=None):
        rows, wts = _tap(t, n_x, iy, wy, ix, wx, row_start, row_len)
        if live is not None:
            wts = jnp.where(live, wts, 0.0)
        return acc + wts[..., None] * jnp.take(flat, rows, axis=0, mode="clip").astype(jnp.float32)

    init = jnp.zeros(iy.shape[:2] + ix.shape[1:2] + flat.shape[-1:], jnp.float32)
    if not dynamic:
        return jax.lax.fori_loop(0, n, add, init, unroll=min(n, _UNROLL))

    def body(step, acc):
        for u in range(_UNROLL):
            t = step * _UNROLL + u
            acc = add(t, acc, t < n)
        return acc

    return jax.lax.fori_loop(0, (n + _UNROLL - 1) // _UNROLL, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_image(meta, flat, iy, wy, ix, wx, row_start, row_len, counts):
    """One image. meta: static (features dtype, N, dynamic); flat (N, C); iy, wy (R, h, T_y);
    ix, wx (R, w, T_x); row_start, row_len (R,) int32: where the RoI's feature map starts
    in `flat` and its width; counts (2,) int32: taps (n_y, n_x) to visit if dynamic.
    Returns (R, h, w, C) float32. Differentiable w.r.t. flat only."""
    return _gather_forward(meta[2], flat, iy, wy, ix, wx, row_start, row_len, counts)


def _gather_image_fwd(meta, flat, *taps):
    return _gather_forward(meta[2], flat, *taps), taps


def _gather_image_bwd(meta, taps, g):
    # The transpose scatter-adds weight * g into the taps' rows, one tap at a time in a
    # rolled loop (the accumulator is updated in place; a deterministic order on CPU).
    dtype, n_rows, dynamic = meta
    iy, _, ix, _, _, _, counts = taps
    n_x, n = _trip(dynamic, iy, ix, counts)

    def body(t, acc):
        rows, wts = _tap(t, n_x, *taps[:-1])
        return acc.at[rows].add(wts[..., None] * g, mode="promise_in_bounds")

    init = jnp.zeros((n_rows, g.shape[-1]), jnp.float32)
    grad = jax.lax.fori_loop(0, n, body, init)
    return (grad.astype(dtype),) + (None,) * len(taps)


_gather_image.defvjp(_gather_image_fwd, _gather_image_bwd)


def _gather(flat, iy, wy, ny, ix, wx, nx, row_start, row_len, dynamic: bool, dtype):
    """All images: flat (B, N, C), taps (B, R, ...) as `_taps` -> (B, R, h, w, C) float32."""
    counts = jnp.stack([ny.max(initial=0), nx.max(initial=0)]).astype(jnp.int32)  # over the whole batch
    fn = functools.partial(_gather_image, (dtype, flat.shape[1], dynamic))
    return jax.vmap(fn, in_axes=(0,) * 7 + (None,))(flat, iy, wy, ix, wx, row_start, row_len, counts)


def _matmul_image(feat, a_y, a_x, precision):
    """One image. feat (H, W, C); a_y (R, h, H); a_x (R, w, W). Returns (R, h, w, C)."""
    rows = jnp.einsum("rpY,YXc->rpXc", a_y.astype(feat.dtype), feat, precision=precision,
                      preferred_element_type=jnp.float32)  # (R, h, W, C)
    return jnp.einsum("rpXc,rqX->rpqc", rows, a_x, precision=precision, preferred_element_type=jnp.float32)


def _check(features, boxes, impl):
    if features.ndim != 4:
        raise ValueError(f"features must be (B, H, W, C), got shape {features.shape}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be (B, R, 4) with B = {features.shape[0]}, got shape {boxes.shape}")
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned",
                                              "max_samples", "impl", "precision"))
def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    impl: str | None = None,
    max_samples=None,
    precision=None,
) -> jax.Array:
    """RoIAlign, as `torchvision.ops.roi_align` (CPU kernel), on NHWC features.

    Args:
      features: (B, H, W, C) float.
      boxes: (B, R, 4) XYXY in input pixels; RoI r of image b pools from features[b].
        Any box (larger than the map, outside it, tiny, degenerate) pools as in
        torchvision; padding RoIs are fine (the caller ignores their output).
      output_size: h or (h, w), static.
      spatial_scale: feature px per input px (1/stride), static.
      sampling_ratio: samples per bin and axis; <= 0: adaptive ceil(roi / output),
        exact for every box (see the module docstring). Static.
      aligned: shift box corners by -0.5 px (Detectron2's ROIAlignV2). Static.
      impl: "gather" (default) or "matmul" (separable einsum, TPU-friendly); see the
        module docstring. Static.
      max_samples: opt-in speed knob of adaptive mode, int or (S_y, S_x), static: lay
        out at most S samples per bin and axis (a static loop of (2 S_y) (2 S_x) taps
        per bin in impl="gather"). NOT exact: a bin that needs g = ceil(roi / output)
        > S samples gets S evenly spread samples instead of torchvision's g; exact only
        when every RoI has ceil(roi_size / output_size) <= S. Default None: exact.
      precision: einsum precision of impl="matmul" (None: backend default; on TPU
        pass "highest" for fp32 parity). Static.
    Returns:
      (B, R, h, w, C) in features.dtype.
    """
    impl = _check(features, boxes, impl)
    out_hw = _pair(output_size)
    b, h_, w_, _ = features.shape
    r = boxes.shape[1]
    boxes = jax.lax.stop_gradient(boxes)
    if impl == "matmul":
        a_y, a_x = roi_align_weights(boxes, (h_, w_), out_hw, spatial_scale, sampling_ratio, aligned, max_samples)
        out = jax.vmap(functools.partial(_matmul_image, precision=precision))(features, a_y, a_x)
        return out.astype(features.dtype)
    grids = _grids(sampling_ratio, max_samples, (h_, w_))
    scale = jnp.full((b, r), spatial_scale, jnp.float32)
    hw = jnp.broadcast_to(jnp.array([h_, w_], jnp.int32), (b, r, 2))
    taps = functools.partial(_taps, boxes, scale, hw, out_hw, aligned=aligned)
    iy, wy, ny, ix, wx, nx = _exact_window(taps, grids, boxes, scale, (h_, w_), out_hw, aligned)
    flat = features.reshape(b, h_ * w_, -1)  # (B, H*W, C)
    zeros = jnp.zeros((b, r), jnp.int32)
    out = _gather(flat, iy, wy, ny, ix, wx, nx, zeros, zeros + w_, grids[0].kind == "exact", features.dtype)
    return out.astype(features.dtype)


# ----------------------------------------------------------------------------- FPN


def infer_scale(feature_size: int, image_size: int) -> float:
    """torchvision's `_infer_scale`: the power of two nearest (in log2) feature / image.

    Computed in float32 with round-half-to-even, as `torch.tensor(x).log2().round()`.
    """
    approx = np.float32(float(feature_size) / float(image_size))
    return float(2.0 ** float(np.round(np.log2(approx))))


def fpn_levels(
    boxes: jax.Array, k_min: int, k_max: int, canonical_scale: float = 224, canonical_level: int = 4,
    eps: float = 1e-6,
) -> jax.Array:
    """FPN level index of each box (torchvision LevelMapper, FPN paper eq. 1).

    boxes: (..., 4) XYXY in input pixels. Returns (...) int32 in [0, k_max - k_min]:
    floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped to
    [k_min, k_max], minus k_min. A box with NaN area (negative area) gets -1
    (torchvision's NaN-to-int64 cast lands on no level, leaving zeros).
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = jnp.sqrt(area.astype(jnp.float32))
    lvl = jnp.floor((canonical_level + jnp.log2(div_exact(s, canonical_scale))) + jnp.float32(eps))
    lvl = jnp.clip(lvl, k_min, k_max)
    return jnp.where(jnp.isnan(lvl), -1, lvl.astype(jnp.int32) - k_min)


def level_scales(feature_hws: Sequence[tuple[int, int]], image_hw: tuple[int, int]):
    """Per-level spatial scales and (k_min, k_max), as torchvision's `_setup_scales`.

    feature_hws: [(H_l, W_l)]; image_hw: (h, w) of the network input (the largest
    image of the batch in torchvision; any (h, w) that rounds to the same powers of
    two, e.g. the padded size, gives the same result). Only the height is used.
    """
    scales = [infer_scale(hw[0], image_hw[0]) for hw in feature_hws]
    k_min = int(-np.log2(np.float32(scales[0])))
    k_max = int(-np.log2(np.float32(scales[-1])))
    return scales, k_min, k_max


@functools.partial(jax.jit, static_argnames=("image_hw", "output_size", "sampling_ratio", "aligned",
                                              "canonical_scale", "canonical_level", "impl", "max_samples",
                                              "precision"))
def multiscale_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    image_hw: tuple[int, int],
    output_size,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    impl: str | None = None,
    max_samples=None,
    precision=None,
) -> jax.Array:
    """Multi-level RoIAlign, as `torchvision.ops.MultiScaleRoIAlign` (FPN heads).

    Args:
      features: list of (B, H_l, W_l, C), finest first (e.g. FPN '0'..'3', strides
        4..32); all levels are used (torchvision's `featmap_names` filter is the
        caller's job).
      boxes: (B, R, 4) XYXY in input pixels.
      image_hw: static (h, w) of the network input; level scales are
        2 ** round(log2(H_l / h)), levels k_min..k_max follow from the first and last.
      output_size, sampling_ratio, aligned, impl, max_samples, precision: as
        `roi_align` (torchvision's MultiScaleRoIAlign always uses aligned=False).
      canonical_scale, canonical_level: LevelMapper's 224 and 4.
    Returns:
      (B, R, h, w, C): each RoI pooled from its level (a single level: no mapping).
    """
    features = list(features)
    for f in features:
        _check(f, boxes, impl)
    impl = DEFAULT_IMPL if impl is None else impl
    hws = [tuple(f.shape[1:3]) for f in features]
    scales, k_min, k_max = level_scales(hws, image_hw)
    kw = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned, impl=impl,
              max_samples=max_samples, precision=precision)
    if len(features) == 1:
        return roi_align(features[0], boxes, spatial_scale=scales[0], **kw)
    boxes = jax.lax.stop_gradient(boxes)
    lvl = fpn_levels(boxes, k_min, k_max, canonical_scale, canonical_level)  # (B, R)
    if impl == "matmul":  # dense per-level matrices: every level, masked by assignment
        out = 0.0
        for i, (f, s) in enumerate(zip(features, scales)):
            o = roi_align(f, boxes, spatial_scale=s, **kw)
            out = out + jnp.where((lvl == i)[..., None, None, None], o, 0).astype(jnp.float32)
        return out.astype(features[0].dtype)
    # gather: one pass over a (B, sum H_l W_l, C) concatenation; each RoI's taps index
    # its own level (size, scale and offset picked per RoI).
    out_hw = _pair(output_size)
    hw_max = (max(h for h, _ in hws), max(w for _, w in hws))
    grids = _grids(sampling_ratio, max_samples, hw_max)
    b = boxes.shape[0]
    flat = jnp.concatenate([f.reshape(b, -1, f.shape[-1]) for f in features], axis=1)
    offsets = np.concatenate([[0], np.cumsum([h * w for h, w in hws])[:-1]]).astype(np.int32)
    safe = jnp.maximum(lvl, 0)
    hw = jnp.asarray(np.array(hws, np.int32))[safe]  # (B, R, 2)
    scale = jnp.asarray(np.array(scales, np.float32))[safe]
    taps = functools.partial(_taps, boxes, scale, hw, out_hw, aligned=aligned)
    iy, wy, ny, ix, wx, nx = _exact_window(taps, grids, boxes, scale, hw_max, out_hw, aligned)
    on_level = lvl >= 0  # NaN-area RoIs pool nothing
    wy = jnp.where(on_level[..., None, None], wy, 0.0)
    ny = jnp.where(on_level[..., None], ny, 0)
    out = _gather(flat, iy, wy, ny, ix, wx, nx, jnp.asarray(offsets)[safe], hw[..., 1], grids[0].kind == "exact",
                  features[0].dtype)
    return out.astype(features[0].dtype)
