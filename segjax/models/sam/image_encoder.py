"""SAM image encoder: a ViTDet-style ViT with windowed / global rel-pos attention and a
conv neck (Kirillov et al. 2023, `segment_anything.modeling.image_encoder`).

Legend: B batch, S input side, H/W token grid (S / patch), D width, C output channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.vit import PatchEmbed, WindowedBlock, resize_pos_embed_2d

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
        b, s_h, s_w, _ = x.shape
        p, d = self.patch_size, self.embed_dim
        if s_h % p or s_w % p:
            raise ValueError(f"input {s_h}x{s_w} is not divisible by the patch size {p}")
        h, w = s_h // p, s_w // p
        x = PatchEmbed(p, d, self.dtype, name="patch_embed")(x)  # (B, H*W, D)
        # NOTE: residual stream in float32 (bf16 compute only inside the matmuls).
        x = x.reshape(b, h, w, d).astype(jnp.float32)
        g = self.pretrain_img_size // p
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, None, None, "embed")), (1, g, g, d))
        x = x + resize_pos_embed_2d(pos, (h, w))
        # `train` (argument 2 counting the module) is static under remat
        block = nn.remat(WindowedBlock, static_argnums=(2,)) if self.remat else WindowedBlock
        for i in range(self.depth):
            x = block(
                self.num_heads, input_size=g,
                window_size=0 if i in self.global_attn_indexes else self.window_size,
                mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, ln_eps=self.ln_eps,
                dtype=self.dtype, drop_path_rate=self.drop_path_rate * i / max(self.depth - 1, 1),
                name=f"blocks_{i}")(x, train)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = layer_norm_2d("neck_1")(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype, name="neck_2")(x)
        return layer_norm_2d("neck_3")(x)  # (B, H, W, C) float32
