"""segjax.ops.resample against torch.nn.functional.interpolate (align_corners=False).

Weights (linear, bicubic) and nearest indices are compared to the bit, read off torch
by interpolating one-hot inputs; values on random unit-range data to the bit for the
host form against torch's generic CPU kernel and to MAX_ABS otherwise. torch rounds
the source position once only in its vectorised builds (AVX2 / AVX512 / CUDA), the
case these tests pin; a torch forced to ATEN_CPU_CAPABILITY=default is skipped.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops import resample
from segjax.testing import importorskip

torch = importorskip("torch")
F = torch.nn.functional

# torch's own kernels (generic, channels-last, one thread) evaluate the same taps in
# different orders: a few float32 steps on values in [0, 1)
MAX_ABS = 3e-7

SIZES = [(300, 800), (451, 1202), (427, 800), (640, 1199), (500, 1066), (333, 800), (7, 13), (13, 7),
         (1000, 37), (31, 19), (5, 1), (1, 6), (2, 3), (17, 17), (683, 800), (1024, 333), (64, 256),
         (170, 300), (256, 451), (300, 17)]
# (n_in, scale_factor): non-integer and integer factors, up and down, odd sizes; the
# first is Mask R-CNN's scale for a 300 x 451 photo at min_size 800
FACTORS = [(300, 800 / 300), (451, 800 / 300), (427, 800 / 427), (500, 1333 / 500), (7, 1.7), (10, 0.37),
           (13, 1.05), (9, 0.33), (5, 0.2), (64, 2.0), (37, 0.5), (19, 3.3)]

_single_rounding = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="torch built for the DEFAULT CPU capability rounds the source index twice")


def _torch_linear_matrix(n_in: int, **kw) -> np.ndarray:
    """(n_out, n_in) weights of F.interpolate(mode='linear'), one one-hot row per input."""
    eye = torch.eye(n_in)[None]  # (1, n_in channels, n_in)
    return F.interpolate(eye, mode="linear", align_corners=False, **kw)[0].T.numpy()


def _torch_cubic_matrix(n_in: int, **kw) -> np.ndarray:
    """(n_out, n_in) weights of F.interpolate(mode='bicubic') along W (H is a copy)."""
    eye = torch.eye(n_in)[None, None]  # (1, 1, n_in, n_in)
    if "scale_factor" in kw:
        kw["scale_factor"] = (1.0, kw["scale_factor"])
    else:
        kw["size"] = (n_in, kw["size"])
    return F.interpolate(eye, mode="bicubic", align_corners=False, **kw)[0, 0].T.numpy()


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- weights


@_single_rounding
@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_linear_weights_bit_exact_with_size(n_in, n_out):
    np.testing.assert_array_equal(resample.linear_matrix(n_in, n_out), _torch_linear_matrix(n_in, size=n_out))


@_single_rounding
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("n_in,factor", FACTORS)
def test_linear_weights_bit_exact_with_scale_factor(n_in, factor, recompute):
    ref = _torch_linear_matrix(n_in, scale_factor=factor, recompute_scale_factor=recompute)
    n_out = resample.interpolate_size(n_in, factor)
    assert ref.shape[0] == n_out
    ours = resample.linear_matrix(n_in, n_out, None if recompute else factor)
    np.testing.assert_array_equal(ours, ref)


def test_scale_factor_changes_the_weights():
    """The two scale conventions differ (so the test above tells them apart)."""
    n_out = resample.interpolate_size(7, 1.7)
    assert not np.array_equal(resample.linear_matrix(7, n_out), resample.linear_matrix(7, n_out, 1.7))


@_single_rounding
@pytest.mark.parametrize("n_in,n_out", [(14, 37), (16, 23), (7, 19), (32, 13), (27, 64), (14, 10), (40, 97),
                                        (16, 10), (64, 40), (14, 32), (3, 8), (9, 9)])
def test_cubic_weights_bit_exact_with_size(n_in, n_out):
    np.testing.assert_array_equal(resample.cubic_matrix(n_in, n_out), _torch_cubic_matrix(n_in, size=n_out))


@_single_rounding
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("n_in,factor", [(14, 2.7), (16, 0.61), (9, 1.05), (40, 3.3), (25, 0.37)])
def test_cubic_weights_bit_exact_with_scale_factor(n_in, factor, recompute):
    ref = _torch_cubic_matrix(n_in, scale_factor=factor, recompute_scale_factor=recompute)
    n_out = resample.interpolate_size(n_in, factor)
    assert ref.shape[0] == n_out
    np.testing.assert_array_equal(resample.cubic_matrix(n_in, n_out, None if recompute else factor), ref)


@_single_rounding
def test_weights_bit_exact_random_scale_factors():
    """100 random (n_in, factor) with the factor reaching the kernel: arbitrary float32
    scales, so source positions use every bit (the cubic kernel's rounding order shows)."""
    rng = np.random.default_rng(4)
    for _ in range(100):
        n_in, factor = int(rng.integers(2, 40)), float(rng.uniform(0.3, 5.0))
        n_out = resample.interpolate_size(n_in, factor)
        if n_out < 1:
            continue
        kw = dict(scale_factor=factor, recompute_scale_factor=False)
        np.testing.assert_array_equal(resample.linear_matrix(n_in, n_out, factor), _torch_linear_matrix(n_in, **kw))
        np.testing.assert_array_equal(resample.cubic_matrix(n_in, n_out, factor), _torch_cubic_matrix(n_in, **kw))


@pytest.mark.parametrize("recompute", [None, True, False])
@pytest.mark.parametrize("n_in,factor", FACTORS + [(20, 2.0), (45, 800 / 45)])
def test_nearest_indices_match_torch(n_in, factor, recompute):
    x = torch.arange(n_in, dtype=torch.float32)[None, None]
    kw = dict(size=round(n_in * factor)) if recompute is None else dict(scale_factor=factor,
                                                                         recompute_scale_factor=recompute)
    ref = F.interpolate(x, mode="nearest", **kw)[0, 0].numpy().astype(np.int64)
    sf = factor if recompute is False else None
    np.testing.assert_array_equal(resample.nearest_indices(n_in, len(ref), sf), ref)


@pytest.mark.parametrize("n_in", [30, 28, 14, 1])
def test_traced_taps_equal_host_taps(n_in):
    """`linear_taps_traced` (jit, traced output length; mask pasting) = `linear_taps`."""
    lengths = np.arange(1, 1500)
    j = np.arange(1500)

    @jax.jit
    def taps(n_out):
        return resample.linear_taps_traced(n_in, n_out, jnp.asarray(j))

    def dense(i0, i1, w0, w1):
        m = np.zeros((len(i0), n_in), np.float64)
        np.add.at(m, (np.arange(len(i0)), i0), w0)
        np.add.at(m, (np.arange(len(i0)), i1), w1)
        return m

    for n_out in lengths[::7].tolist() + [n_in, 800, 1202, 1333, 1499]:
        traced = [np.asarray(a)[:n_out] for a in taps(jnp.int32(n_out))]
        np.testing.assert_array_equal(dense(*traced), dense(*resample.linear_taps(n_in, n_out)))


def test_taps_are_cached_read_only():
    i0, *_ = resample.linear_taps(5, 9)
    with pytest.raises(ValueError):
        i0[0] = 1
    with pytest.raises(ValueError):
        resample.linear_taps(0, 3)


# ----------------------------------------------------------------------------- values


@_single_rounding
@pytest.mark.parametrize("hw,out", [((300, 451), (800, 1202)), ((427, 640), (800, 1199)), ((37, 53), (80, 115)),
                                    ((90, 70), (141, 23)), ((333, 500), (800, 1201))])
def test_bilinear_host_bit_exact_vs_generic_kernel(hw, out):
    """torch's generic CPU kernel (C <= 3, H + W > 128, more than one thread) = ours."""
    x = np.random.default_rng(0).random((3, *hw), dtype=np.float32)
    with _torch_threads(max(2, torch.get_num_threads())):
        ref = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_array_equal(resample.resize_bilinear_host(x, out), ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("hw,kw", [((300, 451), dict(scale_factor=800 / 300, recompute_scale_factor=True)),
                                   ((451, 300), dict(scale_factor=800 / 300, recompute_scale_factor=False)),
                                   ((7, 13), dict(size=(19, 5))), ((30, 30), dict(size=(40, 50))),
                                   ((64, 64), dict(size=(256, 256))), ((170, 256), dict(size=(300, 451))),
                                   ((41, 23), dict(scale_factor=0.37, recompute_scale_factor=False))])
def test_bilinear_values_match_torch(hw, kw, channels, threads):
    """Host, jnp-gather and dense-matrix forms against every torch CPU path."""
    x = np.random.default_rng(1).random((channels, *hw), dtype=np.float32)
    with _torch_threads(threads):
        ref = F.interpolate(torch.from_numpy(x)[None], mode="bilinear", align_corners=False, **kw)[0].numpy()
    out = ref.shape[1:]
    sf = kw.get("scale_factor") if kw.get("recompute_scale_factor") is False else None
    if "scale_factor" in kw:
        assert out == tuple(resample.interpolate_size(n, kw["scale_factor"]) for n in hw)
    host = resample.resize_bilinear_host(x, out, scale_factor=(sf, sf) if sf else None)
    np.testing.assert_allclose(host, ref, rtol=0, atol=MAX_ABS)
    if threads == 1:
        return  # the jnp forms once per case
    my, mx = (resample.linear_matrix(n, o, sf) for n, o in zip(hw, out))
    dense = jnp.einsum("yh,chw,xw->cyx", my, x, mx, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=0, atol=MAX_ABS)
    if sf is None:  # the gather form takes sizes only
        np.testing.assert_allclose(np.asarray(resample.resize_bilinear(jnp.asarray(x), out)), ref, rtol=0,
                                   atol=MAX_ABS)


def test_resize_bilinear_jnp_small_sizes():
    """The jnp gather form (SAM's mask resizes) on unit-variance data, sizes kept,
    grown, shrunk and mixed."""
    x = np.random.default_rng(2).standard_normal((2, 7, 13)).astype(np.float32)
    for out in [(7, 13), (20, 41), (3, 5), (7, 4), (16, 13)]:
        ref = F.interpolate(torch.from_numpy(x)[None], out, mode="bilinear", align_corners=False)[0].numpy()
        np.testing.assert_allclose(np.asarray(resample.resize_bilinear(jnp.asarray(x), out)), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(31, 19), (7, 13), (5, 5), (14, 27)])
def test_linear_1d_values_match_torch(n_in, n_out):
    x = np.random.default_rng(2).random((4, n_in), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=n_out, mode="linear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(resample.resize_linear_host(x, n_out, axis=-1), ref, rtol=0, atol=MAX_ABS)


def test_resized_hw_matches_torchvision_sizes():
    """`resized_hw` = the size `interpolate(scale_factor=..., recompute_scale_factor=True)`
    gives for GeneralizedRCNNTransform's scale, over many odd photo sizes."""
    rng = np.random.default_rng(3)
    sizes = [(427, 640), (375, 500), (333, 500), (300, 451), (640, 480), (1, 1000), *rng.integers(1, 1500, (40, 2))]
    for h, w in sizes:
        h, w = int(h), int(w)
        scale = min(800 / min(h, w), 1333 / max(h, w))
        ref = F.interpolate(torch.zeros(1, 1, h, w), scale_factor=scale, mode="bilinear",
                            recompute_scale_factor=True, align_corners=False).shape[-2:]
        assert resample.resized_hw(h, w, 800, 1333) == tuple(ref), (h, w)
