"""ViT image classifier (timm `VisionTransformer` / MAE `models_vit.py` naming).

Legend: B batch, L patches, D width, C classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.vit import Block, PatchEmbed, layer_norm, sincos_posemb_2d

Dtype = Any


class VisionTransformer(nn.Module):
    """ViT classifier: images (B, H, W, 3) -> {'logits': (B, C)}.

    `global_pool=True` is MAE fine-tuning's head: mean of the patch tokens, then
    `fc_norm`, then `head` (the encoder's final `norm` is dropped, as the reference
    does). `global_pool=False` classifies from the normalised class token.
    The position table starts as the fixed sin-cos table and is learned, as in MAE's
    fine-tuning (the pretrained checkpoint brings its table).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"  # MLP activation, a key of `segjax.models.vit.ACTIVATIONS`
    global_pool: bool = True
    drop_path_rate: float = 0.0
    head_init_scale: float = 1.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, imgs: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        g = self.img_size // self.patch_size
        if imgs.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {imgs.shape}")
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(
            imgs.astype(self.dtype))  # (B, L, D)
        cls = self.param("cls_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, self.embed_dim))
        table = sincos_posemb_2d(self.embed_dim, g, g, True)[None]
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(table), (None, None, "embed")))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.embed_dim)).astype(x.dtype), x], 1)
        x = x + pos.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # stochastic depth decay rule, as timm: linearly 0 -> drop_path_rate
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, drop_path_rate=rates[i], ln_eps=self.ln_eps,
                      dtype=self.dtype, act=self.act, name=f"blocks_{i}")(x, train)
        if self.global_pool:
            feats = layer_norm("fc_norm", self.ln_eps, self.dtype)(x[:, 1:, :].mean(axis=1))
        else:
            feats = layer_norm("norm", self.ln_eps, self.dtype)(x)[:, 0]
        # MAE fine-tuning: trunc_normal(std=2e-5) head, scaled by head_init_scale
        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, name="head",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(2e-5 * self.head_init_scale), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(feats)
        return {"logits": logits.astype(jnp.float32), "features": feats.astype(jnp.float32)}
