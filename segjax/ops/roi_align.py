"""RoIAlign (He et al. 2017, Mask R-CNN) and its FPN multi-level form, static shapes.

Legend: B images, R RoIs per image, H/W feature size, C channels, h/w output size,
S samples per bin and axis, T taps (feature rows or columns) per bin and axis.

Semantics are torchvision's CPU kernel (`torchvision/csrc/ops/cpu/roi_align_kernel.cpp`,
`roi_align_common.h`), bit for bit where the float order allows:
  * box edges scale as `x * spatial_scale - offset`, offset 0.5 if `aligned` else 0;
    with `aligned=False` the RoI size is clamped to >= 1 ("malformed RoIs are 1x1");
  * each of the h x w bins averages S_y x S_x bilinear samples at
    `start + p * bin + (i + 0.5) * bin / S`; S = `sampling_ratio` if > 0, else
    adaptive `ceil(roi_size / output_size)` per RoI (an adaptive S <= 0 gives 0);
  * a sample with y < -1 or y > H (likewise x) contributes zero; y in [-1, 0] reads
    row 0; y >= H - 1 reads row H - 1 only;
  * the sum is divided by the sample count S_y * S_x.

The bilinear weight of a sample factorises into a y part and an x part, and so does
the border rule, so both formulations build per-axis "taps": for every RoI and output
row p, T row indices with weights that already hold the 1 / S_y average (likewise
columns). A bin then reads T_y x T_x feature vectors:
  * `impl="gather"`: accumulates, one tap at a time, weight x (the tap's C-vector of
    the (H*W, C) feature map); cost ~ R h w T_y T_x C and no (H, W)-sized work per
    RoI. Its custom backward scatter-adds the same taps. The default: fastest on CPU.
  * `impl="matmul"`: densifies the taps into per-RoI interpolation matrices
    A_y (h, H) and A_x (w, W) (the S samples of a bin already summed in) and
    contracts `A_y F A_x^T` with two einsums; cost ~ R h H W C (143 GFLOP for the
    benchmark below), independent of S, memory R h W C per image. Made of matmuls only
    (its backward too), which is what TPUs (and bitwise-reproducible GPU backward
    passes) want.
  benchmarks/roi_align.py ((2, 200, 200, 256) map, 1000 RoIs, 7x7, sampling_ratio 2,
  aligned, fp32) on the shared 2-core CPU under a load of 6-13, paired with
  torchvision in the same rounds: gather forward 0.14-0.17 s vs 0.94-1.44 s (8-10x),
  forward+backward 0.75-0.91 s vs 3.1-4.0 s (4.6-5.2x), peak RSS 1.0 GB (torchvision
  1.4 GB); matmul 7-11 s forward, 30-37 s forward+backward, 4.8 GB.
Each sample has two taps per axis (its low and high neighbour), so T = 2 S. Adaptive
sampling uses a bounded grid: S = `max_samples` samples per bin and axis are laid
out and those beyond the RoI's own count are masked (weight 0).

Gradients: w.r.t. `features` only (boxes pass through `stop_gradient`, as
torchvision's roi_align has no box gradient). JAX differentiates the gather into a
scatter-add and the matmul into matmuls; both equal torchvision's backward kernel
up to float summation order, and are deterministic on CPU (scatter-add on GPU may
use atomics; use impl="matmul" there when bitwise-reproducible gradients matter).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.boxes import div_exact, rounded

IMPLS = ("gather", "matmul")
# Measured on the 2-core CPU with benchmarks/roi_align.py (see the module docstring).
DEFAULT_IMPL = "gather"


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"output_size must be a positive int or (h, w), got {v}")
    return v


def default_max_samples(feature_hw: tuple[int, int], output_size) -> tuple[int, int]:
    """Adaptive-sampling bound that is exact for every RoI no larger than the map.

    `ceil(roi / out)` samples per bin, with roi <= H (W), is at most ceil(H / h)
    (ceil(W / w)). Returns (S_y, S_x).
    """
    oh, ow = _pair(output_size)
    return max(1, math.ceil(feature_hw[0] / oh)), max(1, math.ceil(feature_hw[1] / ow))


def _axis_taps(lo, hi, size, n_out: int, sampling_ratio: int, max_samples: int, aligned: bool):
    """Taps of one RoI along one axis.

    lo, hi: () float32 box edges in feature pixels (already times spatial_scale).
    size: () int32 or int, the feature extent along this axis.
    Returns (idx (n_out, T) int32 in [0, size), wts (n_out, T) float32); the weights
    hold the validity mask and the 1 / S of the average.
    """
    f32 = jnp.float32
    offset = 0.5 if aligned else 0.0
    start = lo - offset
    roi = (hi - offset) - start
    if not aligned:
        roi = jnp.maximum(roi, 1.0)  # "force malformed RoIs to be 1x1"
    bin_size = div_exact(roi, n_out)
    if sampling_ratio > 0:
        s = sampling_ratio
        count = jnp.asarray(float(s), f32)
        used = jnp.ones((s,), bool)
    else:
        s = max_samples
        # NOTE: torchvision takes ceil(roi / n_out) samples; a RoI that needs more than
        # the static bound gets `max_samples` evenly spread samples instead.
        count = jnp.clip(jnp.ceil(bin_size), 0.0, float(s))
        used = jnp.arange(s, dtype=f32) < count
    den = jnp.where(count >= 1.0, count, 1.0)  # also for a NaN count (a NaN box pools 0)
    p = jnp.arange(n_out, dtype=f32)[:, None]
    i = jnp.arange(s, dtype=f32)[None, :]
    # same association as the kernel: (start + p * bin) + ((i + .5) * bin) / S
    y = (start + rounded(p * bin_size)) + rounded(div_exact((i + 0.5) * bin_size, den))  # (n_out, S)
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
    # T = 2 S taps: the (low, high) neighbours of every sample
    idx = jnp.stack([low, high], axis=-1).reshape(n_out, 2 * s)
    wts = jnp.stack([w_low, w_high], axis=-1).reshape(n_out, 2 * s)
    return idx, wts


def _box_taps(box, scale, hw, out_hw, sampling_ratio, samples, aligned):
    """Taps of one RoI: box (4,) input px, scale () float, hw (2,) int32 feature size."""
    box = box.astype(jnp.float32) * scale
    iy, wy = _axis_taps(box[1], box[3], hw[0], out_hw[0], sampling_ratio, samples[0], aligned)
    ix, wx = _axis_taps(box[0], box[2], hw[1], out_hw[1], sampling_ratio, samples[1], aligned)
    return iy, wy, ix, wx


def _taps(boxes, scale, hw, out_hw, sampling_ratio, samples, aligned):
    """Vmapped over images and RoIs: boxes (B, R, 4), scale (B, R), hw (B, R, 2)."""
    fn = functools.partial(_box_taps, out_hw=out_hw, sampling_ratio=sampling_ratio, samples=samples,
                           aligned=aligned)
    return jax.vmap(jax.vmap(fn))(boxes, scale, hw)


def _tap(t, iy, wy, ix, wx, row_start, row_len):
    """Tap t = j * Tx + k of every bin: feature rows (R, h, w) int32, weights (R, h, w)."""
    j, k = t // ix.shape[-1], t % ix.shape[-1]
    ty = jax.lax.dynamic_index_in_dim(iy, j, axis=2, keepdims=False)  # (R, h)
    tx = jax.lax.dynamic_index_in_dim(ix, k, axis=2, keepdims=False)  # (R, w)
    rows = row_start[:, None, None] + ty[:, :, None] * row_len[:, None, None] + tx[:, None, :]
    wts = (jax.lax.dynamic_index_in_dim(wy, j, axis=2, keepdims=False)[:, :, None]
           * jax.lax.dynamic_index_in_dim(wx, k, axis=2, keepdims=False)[:, None, :])
    return rows, wts


def _gather_forward(flat, iy, wy, ix, wx, row_start, row_len):
    """out (R, h, w, C) = sum over the T_y T_x taps of weight * flat[row].

    One tap at a time: each step gathers whole C-vectors with bin-invariant indices,
    which XLA vectorises over C (a single gather of all taps followed by a reduction
    is ~20x slower on CPU).
    """
    n = iy.shape[-1] * ix.shape[-1]

    def body(t, acc):
        rows, wts = _tap(t, iy, wy, ix, wx, row_start, row_len)
        return acc + wts[..., None] * jnp.take(flat, rows, axis=0, mode="clip").astype(jnp.float32)

    init = jnp.zeros(iy.shape[:2] + ix.shape[1:2] + flat.shape[-1:], jnp.float32)
    return jax.lax.fori_loop(0, n, body, init, unroll=min(n, 16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_image(meta, flat, iy, wy, ix, wx, row_start, row_len):
    """One image. meta: static (features dtype, N); flat (N, C); iy, wy (R, h, Ty); ix, wx (R, w, Tx); row_start,
    row_len (R,) int32: where the RoI's feature map starts in `flat` and its width.
    Returns (R, h, w, C) float32. Differentiable w.r.t. flat only."""
    return _gather_forward(flat, iy, wy, ix, wx, row_start, row_len)


def _gather_image_fwd(meta, flat, *taps):
    return _gather_forward(flat, *taps), taps


def _gather_image_bwd(meta, taps, g):
    # The transpose scatter-adds weight * g into the taps' rows, one tap at a time in a
    # rolled loop (the accumulator is updated in place; a deterministic order on CPU).
    dtype, n_rows = meta
    iy, _, ix, _, _, _ = taps

    def body(t, acc):
        rows, wts = _tap(t, *taps)
        return acc.at[rows].add(wts[..., None] * g, mode="promise_in_bounds")

    init = jnp.zeros((n_rows, g.shape[-1]), jnp.float32)
    grad = jax.lax.fori_loop(0, iy.shape[-1] * ix.shape[-1], body, init)
    return (grad.astype(dtype),) + (None,) * len(taps)


_gather_image.defvjp(_gather_image_fwd, _gather_image_bwd)


def _matmul_image(feat, iy, wy, ix, wx, precision):
    """One image. feat (H, W, C); taps as in `_gather_image`. Returns (R, h, w, C)."""
    h_, w_ = feat.shape[:2]
    a_y = jnp.einsum("rpt,rptY->rpY", wy, jax.nn.one_hot(iy, h_, dtype=jnp.float32))  # (R, h, H)
    a_x = jnp.einsum("rqt,rqtX->rqX", wx, jax.nn.one_hot(ix, w_, dtype=jnp.float32))  # (R, w, W)
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


def _samples(sampling_ratio, max_samples, feature_hws, out_hw):
    if sampling_ratio > 0:
        return (sampling_ratio, sampling_ratio)
    if max_samples is not None:
        m = (max_samples, max_samples) if isinstance(max_samples, int) else tuple(max_samples)
        if len(m) != 2 or min(m) < 1:
            raise ValueError(f"max_samples must be a positive int or (S_y, S_x), got {max_samples}")
        return m
    per_level = [default_max_samples(hw, out_hw) for hw in feature_hws]
    return max(s[0] for s in per_level), max(s[1] for s in per_level)


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
        Padding RoIs are fine (their output is simply ignored by the caller).
      output_size: h or (h, w), static.
      spatial_scale: feature px per input px (1/stride), static.
      sampling_ratio: samples per bin and axis; <= 0: adaptive ceil(roi / output),
        on a static grid of `max_samples` (see below). Static.
      aligned: shift box corners by -0.5 px (Detectron2's ROIAlignV2). Static.
      impl: "gather" (default on CPU) or "matmul" (separable einsum, TPU-friendly);
        see the module docstring. Static.
      max_samples: adaptive mode only: static bound S on samples per bin and axis,
        int or (S_y, S_x). Default ceil(H / h), ceil(W / w), exact for every RoI that
        is no larger than the feature map; larger RoIs get S evenly spread samples.
        The gather cost grows as (2 S)^2 per bin; a smaller bound (e.g. 4-8 for FPN
        levels) trades exactness on large RoIs for speed.
      precision: einsum precision of impl="matmul" (None: backend default; on TPU
        pass "highest" for fp32 parity). Static.
    Returns:
      (B, R, h, w, C) in features.dtype.
    """
    impl = _check(features, boxes, impl)
    out_hw = _pair(output_size)
    b, h_, w_, _ = features.shape
    r = boxes.shape[1]
    samples = _samples(sampling_ratio, max_samples, [(h_, w_)], out_hw)
    boxes = jax.lax.stop_gradient(boxes)
    scale = jnp.full((b, r), spatial_scale, jnp.float32)
    hw = jnp.broadcast_to(jnp.array([h_, w_], jnp.int32), (b, r, 2))
    iy, wy, ix, wx = _taps(boxes, scale, hw, out_hw, sampling_ratio, samples, aligned)
    if impl == "gather":
        flat = features.reshape(b, h_ * w_, -1)  # (B, H*W, C)
        zeros = jnp.zeros((b, r), jnp.int32)
        meta = (features.dtype, h_ * w_)
        out = jax.vmap(functools.partial(_gather_image, meta))(flat, iy, wy, ix, wx, zeros, zeros + w_)
    else:
        out = jax.vmap(functools.partial(_matmul_image, precision=precision))(features, iy, wy, ix, wx)
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
    samples = _samples(sampling_ratio, max_samples, hws, out_hw)
    b = boxes.shape[0]
    flat = jnp.concatenate([f.reshape(b, -1, f.shape[-1]) for f in features], axis=1)
    offsets = np.concatenate([[0], np.cumsum([h * w for h, w in hws])[:-1]]).astype(np.int32)
    safe = jnp.maximum(lvl, 0)
    hw = jnp.asarray(np.array(hws, np.int32))[safe]  # (B, R, 2)
    scale = jnp.asarray(np.array(scales, np.float32))[safe]
    iy, wy, ix, wx = _taps(boxes, scale, hw, out_hw, sampling_ratio, samples, aligned)
    wy = jnp.where((lvl >= 0)[..., None, None], wy, 0.0)  # NaN-area RoIs pool nothing
    out = jax.vmap(functools.partial(_gather_image, (features[0].dtype, flat.shape[1])))(
        flat, iy, wy, ix, wx, jnp.asarray(offsets)[safe], hw[..., 1])
    return out.astype(features[0].dtype)
