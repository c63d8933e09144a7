"""Antialiased resizing (segjax.ops.resample.aa_matrix / interpolate_host) against
torch.nn.functional.interpolate(antialias=True), the kernel timm's
`resample_abs_pos_embed` uses.

Weights are read off torch by interpolating one-hot inputs: against torch's float64
kernel they agree to float64 rounding; torch's float32 kernel rounds its weight
computation in float32 (WEIGHT_F32). Values: float64-applied weights rounded once vs
torch's float32 passes, a few float32 steps (VALUE_REL of the output's magnitude).
"""

from __future__ import annotations

import numpy as np
import pytest

from segjax.ops import resample
from segjax.testing import importorskip

torch = importorskip("torch")
F = torch.nn.functional

WEIGHT_F32 = 2e-6
VALUE_REL = 1e-6
# up and down, integer and not, odd, to and from one, the MAE 14 -> ViTDet 64 grid
SIZES = [(14, 64), (14, 16), (16, 14), (7, 5), (5, 3), (4, 9), (32, 14), (14, 24), (1, 5), (5, 1),
         (3, 11), (24, 7), (64, 14)]


def _torch_aa_matrix(n_in: int, n_out: int, mode: str, dtype) -> np.ndarray:
    """(n_out, n_in) weights of F.interpolate(antialias=True) along W (H is a copy)."""
    eye = torch.eye(n_in, dtype=dtype)[:, None, None, :]  # (n_in one-hots, 1, 1, n_in)
    out = F.interpolate(eye, size=(1, n_out), mode=mode, antialias=True, align_corners=False)
    return out[:, 0, 0, :].T.double().numpy()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in, n_out", SIZES)
def test_aa_weights_match_torch(n_in, n_out, mode):
    m = resample.aa_matrix(n_in, n_out, mode)
    np.testing.assert_allclose(m, _torch_aa_matrix(n_in, n_out, mode, torch.float64), rtol=0, atol=1e-14)
    np.testing.assert_allclose(m, _torch_aa_matrix(n_in, n_out, mode, torch.float32), rtol=0,
                               atol=WEIGHT_F32)


def test_aa_bicubic_is_not_plain_bicubic():
    """Upsampling with antialias uses Keys' a = -0.5 and cut (renormalised) borders, not
    the a = -0.75 clamped taps of plain bicubic."""
    plain = resample.cubic_matrix(14, 64).astype(np.float64)
    aa = resample.aa_matrix(14, 64)
    assert np.abs(plain - aa).max() > 1e-2
    np.testing.assert_allclose(aa.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("shape, out", [((14, 14, 8), (64, 64)), ((14, 14, 8), (8, 8)),
                                        ((7, 9, 3), (12, 5)), ((16, 16, 4), (16, 16)), ((1, 6, 2), (3, 6))])
def test_interpolate_host_matches_torch(shape, out, mode, antialias):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]  # (1, C, h, w)
    ref = F.interpolate(t, size=out, mode=mode, antialias=antialias, align_corners=False)
    ref = ref[0].permute(1, 2, 0).numpy()
    got = resample.interpolate_host(x, out, mode=mode, antialias=antialias)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=VALUE_REL * np.abs(ref).max() * 4)


def test_interpolate_host_other_axes_and_bad_mode():
    x = np.random.default_rng(1).standard_normal((2, 5, 7, 3)).astype(np.float32)
    a = resample.interpolate_host(x, (9, 4), axes=(1, 2), antialias=True)
    b = np.stack([resample.interpolate_host(x[i], (9, 4), antialias=True) for i in range(2)])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        resample.interpolate_host(x[0], (3, 3), mode="nearest")
    with pytest.raises(ValueError, match="sizes must be positive"):
        resample.aa_matrix(0, 3)


def test_interpolate_host_window_is_a_crop_of_the_full_resize():
    x = np.random.default_rng(2).standard_normal((30, 41, 3)).astype(np.float32)
    for antialias in (True, False):
        full = resample.interpolate_host(x, (70, 12), mode="bilinear", antialias=antialias)
        part = resample.interpolate_host(x, (70, 12), mode="bilinear", antialias=antialias,
                                         window=((5, 60), (3, 12)))
        np.testing.assert_array_equal(part, full[5:60, 3:12])
