"""A fresh ViT trunk (SAM image encoder, ViTDet backbone) trains on padded images: the
patch projection's bias starts as torch's default (non-zero), so padding tokens are not
exactly zero and the first LayerNorm does not blow up their gradient by 1/sqrt(eps)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models


def _grad_norm(  # of the parameters that padding tokens reach first
        model, params, image, hw):
    def loss(p):
        emb = model.apply({"params": p}, image, hw, method="embed_image")
        return jnp.mean(emb ** 2)
    g = jax.grad(loss)(params)["image_encoder"]
    return float(jnp.linalg.norm(g["patch_embed"]["proj"]["bias"])) + float(jnp.linalg.norm(g["pos_embed"]))


def test_fresh_sam_encoder_gradients_stay_bounded_with_padding():
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64)
    image = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), image, np.array([[64, 64]], np.int32),
                        np.zeros((1, 1, 1, 2), np.float32), np.ones((1, 1, 1), np.int32))["params"]
    params = nn.meta.unbox(params)
    bias = np.asarray(params["image_encoder"]["patch_embed"]["proj"]["bias"])
    bound = 1 / np.sqrt(16 * 16 * 3)
    assert np.all(np.abs(bias) <= bound) and np.std(bias) > bound / 4  # torch's uniform default
    full = _grad_norm(model, params, image, np.array([[64, 64]], np.int32))
    padded = _grad_norm(model, params, image, np.array([[32, 64]], np.int32))  # bottom half padding
    assert np.isfinite(padded) and padded < 300 * full  # zero bias: ~1800x, torch default: ~60x, (padded, full)
