"""Shape/contract tests of the ViT blocks, MAE and the classifier (tiny variants)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models import mae as mae_lib
from segjax.models.vit import sincos_posemb_2d


def test_sincos_official_order_first_half_encodes_w():
    t = sincos_posemb_2d(8, 2, 3, cls_token=True)
    assert t.shape == (7, 8) and np.all(t[0] == 0)
    grid = t[1:].reshape(2, 3, 8)
    # first half depends only on w (column), second half only on h (row)
    np.testing.assert_allclose(grid[0, :, :4], grid[1, :, :4])
    np.testing.assert_allclose(grid[:, 0, 4:], grid[:, 1, 4:])
    # omega_0 = 1: sin(w) in channel 0
    np.testing.assert_allclose(grid[0, :, 0], np.sin(np.arange(3)), atol=1e-7)
    hw = sincos_posemb_2d(8, 2, 3, cls_token=False, order="hw")
    np.testing.assert_allclose(hw[:, :4], t[1:, 4:])


def test_patchify_roundtrip_and_order():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    p = mae_lib.patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # (p, q, c) order: second element is channel 1 of pixel (0, 0)
    assert p[0, 0, 1] == x[0, 0, 0, 1] and p[0, 0, 3] == x[0, 0, 1, 0]
    np.testing.assert_array_equal(mae_lib.unpatchify(p, 4, 2), x)


def test_random_masking_static_and_consistent():
    noise = jax.random.uniform(jax.random.key(0), (3, 16))
    keep, mask, restore = mae_lib.random_masking(noise, 0.75)
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    np.testing.assert_array_equal(mask.sum(1), [12, 12, 12])
    # kept = the 4 smallest noise values, and they are exactly the mask == 0 entries
    for b in range(3):
        smallest = set(np.argsort(np.asarray(noise[b]))[:4].tolist())
        assert set(np.asarray(keep[b]).tolist()) == smallest
        assert set(np.nonzero(np.asarray(mask[b]) == 0)[0].tolist()) == smallest
    np.testing.assert_array_equal(jnp.argsort(restore, axis=1), jnp.argsort(noise, axis=1))


@pytest.fixture(scope="module")
def tiny_mae():
    m = models.build("mae_vit_tiny")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    v = nn.meta.unbox(m.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, x))
    return m, v, x


def test_mae_outputs_and_noise(tiny_mae):
    m, v, x = tiny_mae
    noise = jax.random.uniform(jax.random.key(2), (2, 64))
    out = jax.jit(lambda v, x, n: m.apply(v, x, n))(v, x, noise)
    assert out["pred"].shape == (2, 64, 48) and out["mask"].shape == (2, 64)
    assert out["loss"].shape == () and np.isfinite(out["loss"])
    out2 = m.apply(v, x, noise)
    np.testing.assert_allclose(out["loss"], out2["loss"], rtol=1e-5)
    # loss only on masked patches: changing pred where mask == 0 does not change it
    pred = out["pred"] + (1 - out["mask"])[..., None] * 5.0
    l2 = mae_lib.mae_loss(x, pred, out["mask"], 4, m.norm_pix_loss)
    np.testing.assert_allclose(l2, out["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        m.apply(v, x, noise[:, :10])


def test_pos_embed_gets_no_gradient(tiny_mae):
    m, v, x = tiny_mae
    g = jax.grad(lambda p: m.apply({"params": p}, x, rngs={"masking": jax.random.key(0)})["loss"])(v["params"])
    assert float(jnp.abs(g["pos_embed"]).max()) == 0.0
    assert float(jnp.abs(g["decoder_pos_embed"]).max()) == 0.0
    assert float(jnp.abs(g["blocks_0"]["attn"]["qkv"]["kernel"]).max()) > 0.0


def test_bf16_compute_keeps_fp32_params():
    m = models.build("mae_vit_tiny", dtype=jnp.bfloat16)
    x = jnp.ones((1, 32, 32, 3))
    v = nn.meta.unbox(m.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, x))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v))
    out = m.apply(v, x, rngs={"masking": jax.random.key(1)})
    assert out["loss"].dtype == jnp.float32 and np.isfinite(out["loss"])


def test_classifier_heads():
    for gp, keys in ((True, "fc_norm"), (False, "norm")):
        m = models.build("vit_tiny", num_classes=7, global_pool=gp)
        v = m.init(jax.random.key(0), jnp.ones((2, 32, 32, 3)))
        assert keys in v["params"] and "head" in v["params"]
        assert m.apply(v, jnp.ones((2, 32, 32, 3)))["logits"].shape == (2, 7)


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown model"):
        models.build("mae_vit_giant")
    with pytest.raises(ValueError, match="no field"):
        models.build("mae_vit_tiny", embed_dims=3)
    b = models.build("mae_vit_h14")
    assert (b.patch_size, b.embed_dim, b.depth, b.num_heads) == (14, 1280, 32, 16)
    assert (b.decoder_embed_dim, b.decoder_depth, b.decoder_num_heads) == (512, 8, 16)
