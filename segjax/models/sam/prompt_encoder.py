"""SAM prompt encoder: points / box corners as random-Fourier position encodings plus a
learned type embedding; dense mask inputs through a small strided conv net.

Legend: B batch, P prompts, T tokens per prompt, C prompt width, h/w embedding grid.

Point labels (the official ones plus one of ours):
   1 positive point, 0 negative point, -1 "not a point" (the padding point the official
   encoder appends when there is no box: a real token), 2 / 3 box top-left /
   bottom-right corner (the official `_embed_boxes`), ABSENT (-10) padding for static
   shapes: the decoder masks these tokens out of every attention.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.sam import init as torch_init
from segjax.models.sam.image_encoder import layer_norm_2d
from segjax.models.vit import gelu_erf

Dtype = Any
ABSENT = -10


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier features (Tancik et al. 2020): coords in [0, 1]^2 (..., 2) ->
    (..., 2F) = [sin, cos](2 pi (2 coords - 1) G), G (2, F) ~ N(0, 1), fixed."""

    num_pos_feats: int = 128

    @nn.compact
    def __call__(self, coords: jax.Array) -> jax.Array:
        gauss = self.param("positional_encoding_gaussian_matrix", nn.initializers.normal(1.0),
                           (2, self.num_pos_feats))
        # NOTE: a fixed buffer in segment_anything and sam2, never trained: no gradient
        # reaches it (the decoder's backward would otherwise sum the position encoding's
        # gradient over every prompt and layer)
        gauss = jax.lax.stop_gradient(gauss)
        c = 2.0 * coords.astype(jnp.float32) - 1.0
        # NOTE: full fp32 matmul on every backend: sin/cos of |2 pi c G| ~ 10s of radians.
        c = jnp.einsum("...i,if->...f", c, gauss.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        c = 2.0 * np.pi * c
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)


class PatchConv(nn.Module):
    """Conv2d with kernel_size == stride and no padding (`nn.Conv(features, (k, k),
    strides=k, padding="VALID")`: same parameters and names; torch's Conv2d init) on input already cut
    into patches: x (..., k, k, I) -> (..., O), one matmul (..., k k I) @ (k k I, O).
    XLA:CPU runs the strided convolution's weight gradient as a convolution with a
    window the size of the image, several times slower than this matmul."""

    features: int
    kernel_size: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        if x.shape[-3:-1] != (k, k):
            raise ValueError(f"PatchConv({k}): x must be (..., {k}, {k}, I), got {x.shape}")
        # NOTE: torch's Conv2d init (segjax.models.sam.init), not flax's nn.Conv default
        kernel = self.param("kernel", torch_init.KERNEL, (k, k, c, self.features))
        bias = self.param("bias", torch_init.bias(k * k * c), (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jnp.dot(x.reshape(*x.shape[:-3], k * k * c), kernel.reshape(k * k * c, self.features))
        return y + bias.astype(self.dtype)


class PromptEncoder(nn.Module):
    """Sparse (point / corner) and dense (mask) prompt embeddings.

    embed_dim: C. image_embedding_size: (h, w). input_image_size: (S_h, S_w), the padded
    encoder input that point coordinates refer to. mask_in_chans: width of the mask net.
    """

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (1024, 1024)
    mask_in_chans: int = 16
    dtype: Dtype = jnp.float32

    def setup(self):
        c, mc = self.embed_dim, self.mask_in_chans
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        # NOTE: N(0, 1) as torch's nn.Embedding (the reference's init for training from
        # scratch), not flax's default N(0, 1 / C)
        # neg, pos, TL, BR
        self.point_embeddings = [nn.Embed(1, c, embedding_init=torch_init.EMBEDDING) for _ in range(4)]
        self.not_a_point_embed = nn.Embed(1, c, embedding_init=torch_init.EMBEDDING)
        self.no_mask_embed = nn.Embed(1, c, embedding_init=torch_init.EMBEDDING)
        # indices follow the reference nn.Sequential (2 and 5 are GELUs)
        self.mask_downscaling_0 = PatchConv(mc // 4, 2, self.dtype)
        self.mask_downscaling_1 = layer_norm_2d(None)
        self.mask_downscaling_3 = PatchConv(mc, 2, self.dtype)
        self.mask_downscaling_4 = layer_norm_2d(None)
        self.mask_downscaling_6 = PatchConv(c, 1, self.dtype)

    @staticmethod
    def _row(embed: nn.Embed) -> jax.Array:
        return embed(jnp.zeros((1,), jnp.int32))[0].astype(jnp.float32)  # (C,)

    def embed_points(self, coords: jax.Array, labels: jax.Array) -> jax.Array:
        """coords (..., T, 2) float32 (x, y) in input pixels (without the +0.5 pixel-centre
        shift, added here); labels (..., T) int32 -> (..., T, C) float32."""
        s_h, s_w = self.input_image_size
        xy = (coords.astype(jnp.float32) + 0.5) / jnp.asarray([s_w, s_h], jnp.float32)
        pe = self.pe_layer(xy)
        lab = labels[..., None]
        pe = jnp.where(lab < 0, 0.0, pe)  # "not a point" and absent tokens carry no position
        types = [(-1, self.not_a_point_embed)] + [(i, e) for i, e in enumerate(self.point_embeddings)]
        extra = sum(jnp.where(lab == i, self._row(e), 0.0) for i, e in types)
        return pe + extra

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks (B, 4h, 4w, 1) low-res logits -> (B, h, w, C) float32.

        The two stride-2 convs as `PatchConv`s on one rearrangement of the input: pixel
        (4i + 2a + p, 4j + 2b + q) goes to [i, j, a, b, p, q], so the first conv's output
        is (B, h, w, 2, 2, mask_in_chans / 4), already the second one's patches."""
        x = einops.rearrange(masks, "n (h a p) (w b q) i -> n h w a b p q i", a=2, b=2, p=2, q=2)
        x = gelu_erf(self.mask_downscaling_1(self.mask_downscaling_0(x)))  # (B, h, w, 2, 2, mc / 4)
        x = gelu_erf(self.mask_downscaling_4(self.mask_downscaling_3(x)))  # (B, h, w, mc)
        return self.mask_downscaling_6(x[..., None, None, :]).astype(jnp.float32)

    def no_mask(self) -> jax.Array:
        """(C,) the dense embedding used where there is no mask input."""
        return self._row(self.no_mask_embed)

    def get_dense_pe(self) -> jax.Array:
        """(h, w, C) position encoding of the embedding grid's pixel centres."""
        h, w = self.image_embedding_size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)  # (h, w, 2) as (x, y)
        return self.pe_layer(grid)
