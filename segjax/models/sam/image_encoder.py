"""SAM image encoder: a ViTDet-style ViT with windowed / global rel-pos attention and a
conv neck (Kirillov et al. 2023, `segment_anything.modeling.image_encoder`).

Legend: B batch, S input side, H/W token grid (S / patch), D width, C output channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.vit import windowed_vit_trunk

Dtype = Any


def layer_norm_2d(name: str, eps: float = 1e-6) -> nn.LayerNorm:
    """SAM's LayerNorm2d (channel norm of NCHW) = a last-axis LayerNorm on NHWC, kept in
    float32 (two-pass variance, as torch)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class ImageEncoderViT(nn.Module):
    """images (B, S, S, 3) normalised -> embeddings (B, S/P, S/P, C).

    `pretrain_img_size` sets the parameter shapes (pos_embed (1, G, G, D), global
    rel-pos tables (2G - 1, K), G = pretrain_img_size / P); another `img_size` resizes
    pos_embed bicubically (ViTDet `get_abs_pos`) and the global tables linearly
    (`get_rel_pos`). Windowed blocks use tables of 2 * window - 1 rows at any size.

    Training switches (no effect on parameters or on inference): `drop_path_rate`, the
    stochastic depth of the last block, rising linearly from 0 in the first (timm /
    ViTDet `dpr`; active with `train=True` and a 'dropout' rng); `remat`: recompute
    each block's activations in the backward pass (`nn.remat`), trading compute for
    memory at 1024 px.
    """

    img_size: int = 1024
    pretrain_img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        g = self.pretrain_img_size // self.patch_size
        x = windowed_vit_trunk(
            self, x, train, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            window_size=self.window_size, global_attn_indexes=tuple(self.global_attn_indexes), pos_grid=g,
            rel_pos_grid=g, ln_eps=self.ln_eps, mlp_names=("lin1", "lin2"), dtype=self.dtype,
            drop_path_rate=self.drop_path_rate, remat=self.remat)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = layer_norm_2d("neck_1")(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype, name="neck_2")(x)
        return layer_norm_2d("neck_3")(x)  # (B, H, W, C) float32
