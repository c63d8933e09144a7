"""Masked Autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Legend: B batch, L = (H/P)*(W/P) patches, V = int(L * (1 - mask_ratio)) visible
patches, D encoder width, E decoder width, P patch size.

Matches the official `models_mae.py` (and transformers' ViTMAE): patchify order
(p, q, c), argsort-of-noise masking with mask 1 = removed, encoder on visible tokens
only, decoder on the full un-shuffled sequence, MSE on masked patches with the optional
normalised-pixel target (unbiased variance, eps 1e-6).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.vit import Block, PatchEmbed, dense_init, fixed_param, layer_norm, sincos_posemb_2d

Dtype = Any


def patchify(imgs: jax.Array, p: int) -> jax.Array:
    """imgs (B, H, W, C) -> (B, L, P*P*C), each patch flattened as (p, q, c)."""
    return einops.rearrange(imgs, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: jax.Array, p: int, h: int, w: int | None = None, c: int = 3) -> jax.Array:
    """x (B, L, P*P*C) -> imgs (B, h*P, w*P, C); h, w are the patch-grid sizes."""
    w = h if w is None else w
    return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p, c=c)


def random_masking(noise: jax.Array, mask_ratio: float):
    """Per-sample shuffle by argsort of `noise`; keep the V smallest.

    Args:
      noise: (B, L) float, typically uniform [0, 1).
      mask_ratio: fraction removed; V = int(L * (1 - mask_ratio)) as the reference.
    Returns:
      ids_keep (B, V) int32, mask (B, L) float32 (1 = removed), ids_restore (B, L).
    """
    b, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # mask in shuffled order is [0]*V + [1]*(L-V); un-shuffling with a gather gives
    # mask[i] = ids_restore[i] >= V, without materialising the shuffled mask.
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return ids_keep, mask, ids_restore


def mae_loss(imgs: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool) -> jax.Array:
    """Mean squared error on removed patches (reference `forward_loss`).

    imgs (B, H, W, C); pred (B, L, P*P*C); mask (B, L). Returns a float32 scalar.
    """
    target = patchify(imgs, patch_size).astype(jnp.float32)
    if norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True, ddof=1)  # torch.var is unbiased
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred.astype(jnp.float32) - target) ** 2).mean(-1)  # (B, L)
    return (loss * mask).sum() / mask.sum()


def denormalise_patches(pred: jax.Array, imgs: jax.Array, patch_size: int) -> jax.Array:
    """Undoes the normalised-pixel target with each patch's statistics from `imgs`.

    pred (B, L, P*P*C) in per-patch normalised units; imgs (B, H, W, C). Returns
    pred * sqrt(var + 1e-6) + mean with the unbiased variance, the inverse of the
    target in `mae_loss` (and the reference's `forward_loss`).
    """
    target = patchify(imgs.astype(jnp.float32), patch_size)  # (B, L, P*P*C)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    return pred * (var + 1.0e-6) ** 0.5 + mean


class MAE(nn.Module):
    """Masked autoencoder with a ViT encoder and a lightweight ViT decoder.

    Field defaults are MAE ViT-L/16. `__call__(imgs (B, H, W, C), noise (B, L)=None)`
    returns {'loss': (), 'pred': (B, L, P*P*3), 'mask': (B, L)}; noise is drawn from
    the 'masking' RNG stream when not given. Images are normalised as the reference
    expects (ImageNet mean/std) by the caller.

    MLP widths are int(D * mlp_ratio) and int(E * decoder_mlp_ratio) (None: the
    encoder's ratio, as the official MAE); `qkv_bias`, `act` (a key of
    `segjax.models.vit.ACTIVATIONS`) and `ln_eps` apply to encoder and decoder alike, as
    in the official MAE and transformers' ViTMAE.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    decoder_mlp_ratio: float | None = None
    qkv_bias: bool = True
    act: str = "gelu"
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75
    ln_eps: float = 1e-6
    # Channel order of the sin-cos tables built at init ("wh" official). A converted
    # checkpoint brings its own tables, so this only matters for fresh models.
    posemb_order: str = "wh"
    dtype: Dtype = jnp.float32

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def setup(self):
        g, dt = self.grid_size, self.dtype
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dt)
        self.cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, self.embed_dim))
        block = dict(qkv_bias=self.qkv_bias, ln_eps=self.ln_eps, dtype=dt, act=self.act)
        self.blocks = [Block(self.num_heads, self.mlp_ratio, **block) for _ in range(self.depth)]
        self.norm = layer_norm("norm", self.ln_eps, dt)
        self.decoder_embed = nn.Dense(
            self.decoder_embed_dim, dtype=dt,
            kernel_init=nn.with_logical_partitioning(dense_init, ("embed", "decoder_embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("decoder_embed",)))
        self.mask_token = self.param(
            "mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "decoder_embed")),
            (1, 1, self.decoder_embed_dim))
        dec_ratio = self.mlp_ratio if self.decoder_mlp_ratio is None else self.decoder_mlp_ratio
        self.decoder_blocks = [Block(self.decoder_num_heads, dec_ratio, **block)
                               for _ in range(self.decoder_depth)]
        self.decoder_norm = layer_norm("decoder_norm", self.ln_eps, dt)
        self.decoder_pred = nn.Dense(
            self.patch_size**2 * self.in_chans, dtype=dt,
            kernel_init=nn.with_logical_partitioning(dense_init, ("decoder_embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        # Fixed sin-cos tables, stored as parameters (see `fixed_param`).
        self.pos_embed = fixed_param(
            self, "pos_embed", sincos_posemb_2d(self.embed_dim, g, g, True, self.posemb_order)[None],
            (None, None, "embed"))
        self.decoder_pos_embed = fixed_param(
            self, "decoder_pos_embed",
            sincos_posemb_2d(self.decoder_embed_dim, g, g, True, self.posemb_order)[None],
            (None, None, "decoder_embed"))

    def forward_encoder(self, imgs: jax.Array, noise: jax.Array, mask_ratio: float):
        """imgs (B, H, W, C), noise (B, L) -> latent (B, 1+V, D), mask, ids_restore."""
        x = self.patch_embed(imgs.astype(self.dtype))  # (B, L, D)
        pos = jax.lax.stop_gradient(self.pos_embed)
        x = x + pos[:, 1:, :].astype(x.dtype)
        ids_keep, mask, ids_restore = random_masking(noise, mask_ratio)
        x = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)  # (B, V, D)
        cls = (self.cls_token + pos[:, :1, :]).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """latent (B, 1+V, D), ids_restore (B, L) -> pred (B, L, P*P*C)."""
        x = self.decoder_embed(latent)  # (B, 1+V, E)
        b, v1, e = x.shape
        length = ids_restore.shape[1]
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, length + 1 - v1, e))
        x_ = jnp.concatenate([x[:, 1:, :], mask_tokens], axis=1)  # (B, L, E) shuffled order
        # un-shuffle with a gather (no scatter), as the reference's torch.gather
        x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1, :], x_], axis=1)  # (B, 1+L, E)
        x = x + jax.lax.stop_gradient(self.decoder_pos_embed).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "decoder_embed"))
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def __call__(self, imgs: jax.Array, noise: jax.Array | None = None,
                 mask_ratio: float | None = None, train: bool = False) -> dict[str, jax.Array]:
        del train  # MAE pretraining uses no dropout / drop path
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if imgs.ndim != 4 or imgs.shape[-1] != self.in_chans:
            raise ValueError(f"expected images (B, H, W, {self.in_chans}), got {imgs.shape}")
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (imgs.shape[0], self.num_patches))
        if noise.shape != (imgs.shape[0], self.num_patches):
            raise ValueError(f"noise must be (B, L) = {(imgs.shape[0], self.num_patches)}, got {noise.shape}")
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)
        return {"loss": loss, "pred": pred.astype(jnp.float32), "mask": mask}

    def reconstruct(self, pred: jax.Array, imgs_shape: tuple[int, ...]) -> jax.Array:
        """pred (B, L, P*P*C) -> images (B, H, W, C) in the (normalised) input space."""
        g = imgs_shape[1] // self.patch_size
        return unpatchify(pred, self.patch_size, g, imgs_shape[2] // self.patch_size, self.in_chans)
