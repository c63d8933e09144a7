"""Resampling as `torch.nn.functional.interpolate` computes it: the one home of the taps.

Legend: n_in / n_out the input / output length of one axis, j an output index, src
its source position, (h, w) -> (H, W) a 2-D resize.

Every resize in segjax that mirrors `F.interpolate` takes its taps from here (position
tables in `models/vit.py`, the Mask R-CNN input transform and ground-truth masks, the
FPN's nearest upsampling, mask pasting in `ops/masks.py` and the COCO evaluator, SAM's
mask upscaling), so they all round where torch rounds. (Resizes that mirror PIL, as
SAM's `ResizeLongestSide` and the classification preprocessing, stay PIL's.) The
arithmetic is ATen's CPU upsampling (`native/UpSample.h`,
`native/cpu/UpSampleKernel.cpp`) for float32 data, `align_corners=False`, no
antialiasing:

  size     `size=`, or int(n_in * scale_factor) in float64 (`interpolate_size`; the
           same with either `recompute_scale_factor`).
  scale    float32(1 / scale_factor) (the division in float64) when a scale factor
           reaches the kernel (`scale_factor=` with `recompute_scale_factor` False or
           None); otherwise float32(n_in) / float32(n_out).
  source   src = scale * (j + 0.5) - 0.5, rounded to float32 ONCE: torch's CPU
           kernels built for AVX2 / AVX512 contract it into a fused multiply-add (as
           CUDA's compiler does by default; not checked here). Here it is evaluated in
           float64, where the product is exact. (A torch forced to
           ATEN_CPU_CAPABILITY=default rounds twice: one float32 step of src away from
           itself.) Linear modes clamp src at 0.
  linear   i0 = min(floor(src), n_in - 1), i1 = i0 + 1 unless i0 is the last input,
           w1 = clamp(src - i0, 0, 1) (exact), w0 = 1 - w1 in float32;
           out[j] = w0 x[i0] + w1 x[i1]. n_out == n_in copies, whatever the scale.
  cubic    i = min(floor(src), n_in - 1) (src not clamped), t = clamp(src - i, 0, 1),
           Keys' kernel (A = -0.75) at t + 1, t, 1 - t, 2 - t in float32, with the
           multiply-adds fused where torch 2.14's x86 build fuses them (found by
           comparison: `_keys_near`, `_keys_far`), taps i - 1 .. i + 2 clamped into
           [0, n_in - 1].
  nearest  min(floor(float32(j) * scale), n_in - 1) (`mode="nearest"`).

The weights here are torch's to the bit (tests/ops/test_resample.py interpolates
one-hot inputs). Applying them is exact to the bit only on the host
(`resize_linear_host`, `resize_bilinear_host`, `resize_image`: torch's generic CPU
kernel, out = fma(x[i0], w0, x[i1] * w1) per axis, the last axis first); torch itself
evaluates the same taps in other orders on other paths (it picks a channels-last
kernel by channel count, output size and thread count), so against torch in general
values agree to a few float32 steps. The jnp forms (`resize_axis`, `resize_bilinear`,
and the dense `linear_matrix` / `cubic_matrix` for an einsum) run on any backend with
static shapes; `linear_taps_traced` computes the taps inside jit for a traced output
length (mask pasting), rounding src once where XLA fuses the multiply-add: XLA:CPU
does (pinned by a test against the host taps); elsewhere a backend that does not
fuse is one float32 step of src off in rare outputs.

Antialiased resizing (`interpolate(..., antialias=True)`, which timm's
`resample_abs_pos_embed` uses by default) is another kernel, PIL's: ATen's separable
`_upsample_bicubic2d_aa` / `_upsample_bilinear2d_aa`. Per output j, with
scale = n_in / n_out, support = (2 for bicubic, 1 for bilinear) x max(scale, 1):
center = scale * (j + 0.5), taps xmin = max(int(center - support + 0.5), 0) up to
min(int(center + support + 0.5), n_in) (no clamped taps: the window is cut at the
borders), weight filter((i - center + 0.5) / max(scale, 1)) normalised to sum 1. The
bicubic filter is Keys' with A = -0.5 (PIL's), not the -0.75 of plain bicubic, when
upsampling too. `aa_matrix` computes these weights in float64 (torch's float64 kernel
to within 1e-15); torch's float32 kernel rounds its intermediate steps in float32, so
the float32 weights differ from it by a few float32 steps (tests/ops/test_resample.py).
`interpolate_host` applies either kind to two axes of a host array.

`resized_hw` and `resize_image` are torchvision's detection input transform
(`GeneralizedRCNNTransform.resize`): the data pipeline, the Mask R-CNN predictor and
`models/maskrcnn/mask_rcnn.prepare_image` all use them from here.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False  # cached: callers must not edit them in place
    return arrays


def _check_sizes(n_in: int, n_out: int) -> None:
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")


def _fma(a, b, c) -> np.ndarray:
    """a * b + c rounded to float32 as one fused multiply-add: float64 holds the product
    of two float32 exactly; the sum rounds to float64 first, which can change the
    float32 result only where that lands exactly halfway between two float32."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F32)


# ----------------------------------------------------------------------------- sizes, scale, source


def interpolate_size(n_in: int, scale_factor: float) -> int:
    """Output length of `interpolate(scale_factor=...)`: int(n_in * scale_factor), float64."""
    return int(n_in * float(scale_factor))


def source_scale(n_in: int, n_out: int, scale_factor: float | None = None) -> np.float32:
    """The float32 step between source positions (ATen `area_pixel_compute_scale`).

    `scale_factor`: the user's factor when it reaches the kernel (`scale_factor=` with
    `recompute_scale_factor` False/None); None for `size=` or
    `recompute_scale_factor=True`.
    """
    if scale_factor is not None and scale_factor > 0:
        return _F32(1.0 / float(scale_factor))
    return _F32(n_in) / _F32(n_out)


def source_index(scale: np.float32, n_out: int) -> np.ndarray:
    """(n_out,) float32 src = scale * (j + 0.5) - 0.5 rounded once (see the module doc):
    float64 holds the product of a float32 and j + 0.5 exactly."""
    j = np.arange(n_out, dtype=np.float64)
    return (np.float64(scale) * (j + 0.5) - 0.5).astype(_F32)


# ----------------------------------------------------------------------------- linear


@functools.lru_cache(maxsize=256)
def linear_taps(n_in: int, n_out: int, scale_factor: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1), each (n_out,) (int32, int32, float32, float32), with
    out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]]: torch's linear taps, to the bit.

    Read-only (cached)."""
    _check_sizes(n_in, n_out)
    if n_in == n_out:  # torch copies
        i = np.arange(n_out, dtype=np.int32)
        return _frozen(i, i.copy(), np.ones(n_out, _F32), np.zeros(n_out, _F32))
    src = np.maximum(source_index(source_scale(n_in, n_out, scale_factor), n_out), _F32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    w1 = np.clip(src - i0.astype(_F32), _F32(0.0), _F32(1.0)).astype(_F32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0).astype(np.int32)
    return _frozen(i0, i1, (_F32(1.0) - w1).astype(_F32), w1)


def linear_matrix(n_in: int, n_out: int, scale_factor: float | None = None,
                  dtype=np.float32) -> np.ndarray:
    """(n_out, n_in) dense form of `linear_taps` (for an einsum / matmul).

    The two weights of an output whose taps coincide (the last input) are summed in
    float64 (exact), then cast to `dtype`; float64 keeps every float32 weight exact
    (for composing resizes, as SAM's upscaling does)."""
    i0, i1, w0, w1 = linear_taps(n_in, n_out, scale_factor)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
    return m.astype(dtype)


def linear_taps_traced(n_in: int, n_out, j):
    """`linear_taps` inside jit for a traced output length (jnp).

    Args:
      n_in: static input length.
      n_out: traced int scalar (>= 1), the output length.
      j: traced int array of output indices (any shape; values outside [0, n_out)
        give taps the caller is expected to mask).
    Returns:
      (i0, i1, w0, w1) shaped like j (int32, int32, float32, float32).

    The same steps as `linear_taps`; src rounds once where XLA fuses the multiply-add
    into an FMA (XLA:CPU does), else twice. n_out == n_in needs no branch: the scale is
    exactly 1, so src = j and the taps are the copy's.
    """
    scale = jnp.float32(n_in) / jnp.asarray(n_out).astype(jnp.float32)
    src = jnp.maximum(scale * (jnp.asarray(j).astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = jnp.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - w1, w1


# ----------------------------------------------------------------------------- cubic


_A = _F32(-0.75)  # Keys' a, as torch's `get_cubic_upsample_coefficients`


def _keys_near(x: np.ndarray) -> np.ndarray:
    """((A + 2) x - (A + 3)) x x + 1 for |x| <= 1, float32 as torch's compiled kernel
    evaluates it: the first multiply-add fused, the rest rounded step by step (any
    other choice misses torch on some weights)."""
    t = _fma(_A + _F32(2), x, -(_A + _F32(3)))
    return (t * x * x + _F32(1)).astype(_F32)


def _keys_far(x: np.ndarray) -> np.ndarray:
    """((A x - 5 A) x + 8 A) x - 4 A for 1 <= |x| <= 2, float32: the first two
    multiply-adds fused, the last rounded step by step (as torch's compiled kernel;
    any other choice misses torch on some weights)."""
    t = _fma(_A, x, -(_F32(5) * _A))
    t = _fma(t, x, _F32(8) * _A)
    return (t * x - _F32(4) * _A).astype(_F32)


@functools.lru_cache(maxsize=64)
def cubic_taps(n_in: int, n_out: int, scale_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(idx (n_out, 4) int32, w (n_out, 4) float32) with out[j] = sum_k w[j, k] x[idx[j, k]]:
    torch's bicubic taps (A = -0.75, borders clamped), to the bit. Read-only (cached)."""
    _check_sizes(n_in, n_out)
    src = source_index(source_scale(n_in, n_out, scale_factor), n_out)  # not clamped at 0
    i = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    t = np.clip(src - i.astype(_F32), _F32(0.0), _F32(1.0)).astype(_F32)
    t2 = (_F32(1.0) - t).astype(_F32)
    w = np.stack([_keys_far((t + _F32(1)).astype(_F32)), _keys_near(t),
                  _keys_near(t2), _keys_far((t2 + _F32(1)).astype(_F32))], axis=1)
    idx = np.clip(i[:, None] + np.arange(-1, 3, dtype=np.int32), 0, n_in - 1).astype(np.int32)
    return _frozen(idx, w.astype(_F32))


def cubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None) -> np.ndarray:
    """(n_out, n_in) float32 dense form of `cubic_taps`; the weights of clamped taps
    that meet at a border are summed in tap order in float32 (as torch accumulates)."""
    idx, w = cubic_taps(n_in, n_out, scale_factor)
    m = np.zeros((n_out, n_in), _F32)
    rows = np.arange(n_out)
    for k in range(4):
        np.add.at(m, (rows, idx[:, k]), w[:, k])
    return m


# ----------------------------------------------------------------------------- nearest


def nearest_indices(n_in: int, n_out: int, scale_factor: float | None = None) -> np.ndarray:
    """(n_out,) int64 source indices of `interpolate(mode="nearest")`:
    min(floor(float32(j) * scale), n_in - 1), the product rounded to float32."""
    _check_sizes(n_in, n_out)  # (torch's copy for n_out == n_in without a factor is this formula's result)
    scale = source_scale(n_in, n_out, scale_factor)
    return np.minimum(np.floor(np.arange(n_out, dtype=_F32) * scale).astype(np.int64), n_in - 1)


# ----------------------------------------------------------------------------- applying: host


def resize_linear_host(x: np.ndarray, n_out: int, axis: int, scale_factor: float | None = None) -> np.ndarray:
    """Linear resize of one axis of a host array, float32, with torch's generic CPU
    kernel arithmetic: out = fma(x[i0], w0, x[i1] * w1)."""
    x = np.asarray(x, _F32)
    axis = axis % x.ndim
    if x.shape[axis] == n_out:
        return x.copy()
    i0, i1, w0, w1 = linear_taps(x.shape[axis], n_out, scale_factor)
    shape = [1] * x.ndim
    shape[axis] = n_out
    far = np.take(x, i1, axis=axis) * w1.reshape(shape)
    return _fma(np.take(x, i0, axis=axis), w0.reshape(shape), far)


def resize_bilinear_host(x: np.ndarray, out_hw: tuple[int, int], axes: tuple[int, int] = (-2, -1),
                         scale_factor: tuple[float, float] | None = None) -> np.ndarray:
    """Bilinear resize of the (H, W) `axes` of a host array, float32: torch's generic
    CPU kernel, the W axis first (bit-exact against it, up to float64's double
    rounding in a tie, which no test has met)."""
    sf = scale_factor or (None, None)
    x = resize_linear_host(x, out_hw[1], axes[1], sf[1])
    return resize_linear_host(x, out_hw[0], axes[0], sf[0])


# ----------------------------------------------------------------------------- applying: jnp


def resize_axis(x: jnp.ndarray, n_out: int, axis: int, keep: int | None = None) -> jnp.ndarray:
    """Linear resize of `axis` to `n_out` (jnp, two gathers), evaluated at the first
    `keep` outputs only (all when None)."""
    i0, i1, w0, w1 = (a[:keep] for a in linear_taps(x.shape[axis], n_out))
    shape = [1] * x.ndim
    shape[axis] = len(i0)
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    return w0 * jnp.take(x, jnp.asarray(i0), axis=axis) + w1 * jnp.take(x, jnp.asarray(i1), axis=axis)


def resize_bilinear(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """(..., h, w) -> (..., H, W): torch bilinear (jnp), the W pass first as torch's kernel."""
    return resize_axis(resize_axis(x, out_hw[1], -1), out_hw[0], -2)


# ----------------------------------------------------------------------------- antialiased


def _aa_filter(mode: str):
    if mode == "bicubic":
        a = -0.5  # Keys' a as PIL (and torch's antialiased bicubic)

        def cubic(x: np.ndarray) -> np.ndarray:
            x = np.abs(x)
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
            return np.where(x < 1, near, np.where(x < 2, far, 0.0))

        return cubic, 2.0
    if mode == "bilinear":
        return (lambda x: np.maximum(1.0 - np.abs(x), 0.0)), 1.0
    raise ValueError(f"antialiased mode must be 'bicubic' or 'bilinear', got {mode!r}")


@functools.lru_cache(maxsize=64)
def aa_matrix(n_in: int, n_out: int, mode: str = "bicubic") -> np.ndarray:
    """(n_out, n_in) float64 weights of `interpolate(size=n_out, mode=mode,
    antialias=True, align_corners=False)` along one axis (see the module doc).
    Read-only (cached)."""
    _check_sizes(n_in, n_out)
    if n_in == n_out:  # torch copies an axis whose size does not change
        return _frozen(np.eye(n_out))[0]
    fn, half = _aa_filter(mode)
    scale = n_in / n_out
    support = half * scale if scale >= 1.0 else half
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), np.float64)
    for j in range(n_out):
        center = scale * (j + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = fn((np.arange(lo, hi) - center + 0.5) * inv)
        total = w.sum()
        m[j, lo:hi] = w / total if total != 0.0 else w
    return _frozen(m)[0]


def _apply_rows(x: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    """out[j] = sum_i m[j, i] x[i] along `axis` (float64), through each row's band of
    nonzero weights (a few taps) instead of the dense product."""
    nz = m != 0
    lo = np.where(nz.any(1), nz.argmax(1), 0)
    hi = np.where(nz.any(1), m.shape[1] - nz[:, ::-1].argmax(1), 0)
    k = int((hi - lo).max()) if len(m) else 0
    shape = [1] * x.ndim
    shape[axis] = len(m)
    out = np.zeros(x.shape[:axis] + (len(m),) + x.shape[axis + 1:], np.float64)
    for t in range(k):
        idx = np.minimum(lo + t, m.shape[1] - 1)
        w = np.where(lo + t < hi, m[np.arange(len(m)), idx], 0.0)
        out += w.reshape(shape) * np.take(x, idx, axis=axis)
    return out


def interpolate_host(x: np.ndarray, out_hw: tuple[int, int], axes: tuple[int, int] = (0, 1),
                     mode: str = "bicubic", antialias: bool = False,
                     window: tuple[tuple[int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """`F.interpolate(x, size=out_hw, mode=mode, align_corners=False, antialias=...)`
    over the two `axes` of a host array: float32 in and out.

    mode: 'bicubic' or 'bilinear'. Without antialias the weights are torch's float32
    taps to the bit (`cubic_matrix` / `linear_matrix`); with it, `aa_matrix`. Either is
    applied in float64 and rounded once, so the result is the exact resize of the
    float32 input up to that rounding (torch's float32 kernels round each pass).
    window: ((start, stop), (start, stop)) output rows / columns to compute (a crop of
    the resized array, computed alone), all when None.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    x = np.asarray(x, np.float64)
    window = window or ((0, out_hw[0]), (0, out_hw[1]))
    for axis, n_out, (start, stop) in zip(axes, out_hw, window):
        n_in = x.shape[axis]
        if antialias:
            m = aa_matrix(n_in, n_out, mode)
        elif mode == "bicubic":
            m = cubic_matrix(n_in, n_out).astype(np.float64)
        else:
            m = linear_matrix(n_in, n_out, dtype=np.float64)
        x = _apply_rows(x, m[start:stop], axis)
    return x.astype(_F32)


# ----------------------------------------------------------------------------- detection input


def resized_hw(h: int, w: int, min_size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """torchvision `GeneralizedRCNNTransform`'s resized size: scale = min(min_size / short
    side, max_size / long side) as a Python float, then `interpolate(scale_factor=scale,
    recompute_scale_factor=True)`: int(side * scale) per side."""
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    return interpolate_size(h, scale), interpolate_size(w, scale)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) image (any dtype) -> (H, W, C) float32, `interpolate(mode="bilinear",
    align_corners=False)` to `size=hw` (which `recompute_scale_factor=True` also
    reduces to), with torch's CPU arithmetic (`resize_bilinear_host`)."""
    return resize_bilinear_host(image, hw, axes=(0, 1))
