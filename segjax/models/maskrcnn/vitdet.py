"""ViTDet backbone (Li, Mao, Girshick, He 2022): a plain ViT and a simple feature pyramid
built from its single stride-16 map, as detectron2's `projects/ViTDet` (`ViT` +
`SimpleFeaturePyramid` + `LastLevelMaxPool`).

Legend: B batch, S input side, H/W token grid (S / P), P patch size, D width, F pyramid
channels, G the pretraining token grid.

The ViT is `segjax.models.vit.windowed_vit_trunk`, the trunk SAM's image encoder runs
(`WindowedBlock`s): windowed attention in every block but
`global_attn_indexes`, decomposed relative positions (tables (2 * window - 1, K) in
windowed blocks, (2 * img_size / P - 1, K) in global ones), and an absolute position
table of the pretraining grid (1, G, G, D) resized bicubically to the input grid on
every call (detectron2 `get_abs_pos`). Stochastic depth rises linearly from 0 in the
first block to `drop_path_rate` in the last (detectron2's `dpr`).

Parameters (names follow detectron2's state dict, `.` before an index -> `_`):
  net/patch_embed/proj, net/pos_embed (1, G, G, D), net/blocks_{i}/{norm1, attn/{qkv,
  proj, rel_pos_h, rel_pos_w}, norm2, mlp/{fc1, fc2}}  (the MAE / timm block names)
  simfp_{2..5}/...  one pyramid level per stride 2**s:
    s=2 (scale 4):   up_0 ConvTranspose 2x2 s2 (D -> D/2), up_0_norm LN, GELU, up_1 (D/2 -> D/4)
    s=3 (scale 2):   up_0 (D -> D/2)
    s=4 (scale 1):   identity
    s=5 (scale 1/2): max-pool 2x2 s2
    then conv1x1 (no bias) + conv1x1_norm, conv3x3 (no bias) + conv3x3_norm, to F.
  LN is detectron2's channel LayerNorm (eps 1e-6) = a last-axis LayerNorm on NHWC.
Output: [P2, P3, P4, P5, P6], P6 = P5[:, ::2, ::2] (LastLevelMaxPool, k=1 s=2).

NOTE: detectron2 stores `pos_embed` as (1, 1 + G*G, D) with an (unused) class-token row;
we keep the (1, G, G, D) grid of SAM's encoder, the converter drops / re-adds that row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.maskrcnn.backbone import conv
from segjax.models.maskrcnn.roi_heads import ConvTranspose2x2
from segjax.models.sam.image_encoder import layer_norm_2d
from segjax.models.vit import windowed_vit_trunk

Dtype = Any

LN_EPS = 1e-6  # detectron2 `LayerNorm` (get_norm("LN", ...)) and the ViT's norms


class ViTDetNet(nn.Module):
    """Plain ViT trunk: normalised images (B, S, S, 3) -> last feature map (B, S/P, S/P, D).

    `pretrain_img_size` sets pos_embed (1, G, G, D), G = pretrain_img_size / P (224 for
    MAE / ImageNet checkpoints); `img_size` sets the global blocks' rel-pos tables
    (2 * img_size / P - 1 rows, the detectron2 `input_size`). Other input sizes resize
    both (bicubic / linear). `train` turns on drop path (needs the 'dropout' rng);
    `remat` recomputes each block in the backward pass.
    """

    img_size: int = 1024
    pretrain_img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    drop_path_rate: float = 0.1
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = self.patch_size
        if self.pretrain_img_size % p or self.img_size % p:
            raise ValueError(f"img_size {self.img_size} and pretrain_img_size {self.pretrain_img_size} "
                             f"must be multiples of the patch size {p}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside the {self.depth} blocks")
        x = windowed_vit_trunk(
            self, x, train, patch_size=p, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, window_size=self.window_size,
            global_attn_indexes=tuple(self.global_attn_indexes), pos_grid=self.pretrain_img_size // p,
            rel_pos_grid=self.img_size // p, ln_eps=LN_EPS, mlp_names=("fc1", "fc2"), dtype=self.dtype,
            drop_path_rate=self.drop_path_rate, remat=self.remat, pos_init=nn.initializers.truncated_normal(0.02))
        return x  # (B, H, W, D) float32


class PyramidLevel(nn.Module):
    """One `simfp_{s}` level: (B, H, W, D) stride 16 -> (B, H*scale, W*scale, F)."""

    scale: float
    out_channels: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if self.scale == 4.0:
            x = ConvTranspose2x2(d // 2, self.dtype, name="up_0")(x)
            x = layer_norm_2d("up_0_norm", LN_EPS)(x)
            x = nn.gelu(x, approximate=False)
            x = ConvTranspose2x2(d // 4, self.dtype, name="up_1")(x)
        elif self.scale == 2.0:
            x = ConvTranspose2x2(d // 2, self.dtype, name="up_0")(x)
        elif self.scale == 0.5:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        elif self.scale != 1.0:
            raise ValueError(f"simple feature pyramid scale {self.scale} not in (4, 2, 1, 0.5)")
        # detectron2 Conv2d(..., bias=False, norm=LN): c2_msra_fill (kaiming normal fan-out)
        kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = conv(self.out_channels, 1, bias=False, name="conv1x1", dtype=self.dtype, kernel_init=kaiming)(x)
        x = layer_norm_2d("conv1x1_norm", LN_EPS)(x)
        x = conv(self.out_channels, 3, bias=False, name="conv3x3", dtype=self.dtype, kernel_init=kaiming)(x)
        return layer_norm_2d("conv3x3_norm", LN_EPS)(x)


class ViTDetBackbone(nn.Module):
    """`net` (a ViTDetNet) + `simfp_{2..5}` -> [P2, P3, P4, P5, P6], each (B, H_l, W_l, F).

    `out_channels` F; `scale_factors` (4, 2, 1, 0.5) of the stride-P map.
    """

    net: ViTDetNet
    out_channels: int = 256
    scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        feat = self.net(x, train)
        outs = []
        for scale in self.scale_factors:
            stage = int(math.log2(self.net.patch_size / scale))
            outs.append(PyramidLevel(float(scale), self.out_channels, self.dtype, name=f"simfp_{stage}")(feat))
        outs.append(outs[-1][:, ::2, ::2])  # LastLevelMaxPool: max_pool2d(k=1, s=2) of P5
        return outs
