"""Segment Anything (Kirillov et al. 2023): image encoder, prompt encoder, mask decoder.

Legend: B images, S input side (img_size), h/w = S / patch embedding grid, C prompt
width, P prompts per image, T tokens per prompt, M masks per prompt.

Two entry points, used through `model.apply(params, ..., method=...)`:
  embed_image(images, input_hw) -> (B, h, w, C)            once per image
  predict_masks(image_embeddings, coords, labels, ...)      many prompts per image
Pixel normalisation and the zero padding outside the resized image happen here, so a
checkpoint plus its builder defines the input convention. Host-side resizing and mask
post-processing live in `segjax.inference`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.sam.image_encoder import ImageEncoderViT
from segjax.models.sam.mask_decoder import MaskDecoder
from segjax.models.sam.prompt_encoder import ABSENT, PromptEncoder

Dtype = Any


class Sam(nn.Module):
    """SAM with the official `build_sam_vit_b` numbers as defaults.

    img_size: S, the (square, padded) encoder input side. pretrain_img_size: the side the
      position table and global rel-pos tables were trained for (parameter shapes);
      another img_size resizes them (see `ImageEncoderViT`).
    dtype: compute dtype of matmuls / convs; LayerNorms, softmax, position encodings
      and outputs stay float32.
    encoder_drop_path_rate, encoder_remat: training switches of the image encoder
      (see `ImageEncoderViT`); they change no parameter.
    decoder_remat: recompute the mask decoder's activations in the backward pass
      (`nn.remat`; only its inputs are kept per call): a training switch for the
      11-round rollout, whose decoder activations grow with masks x rounds (one
      prompt's two-way transformer and upscaling hold ~L C floats many times over).
      Same parameters and math (XLA fuses differently, so sums may round differently).
    """

    img_size: int = 1024
    pretrain_img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    encoder_ln_eps: float = 1e-6
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    decoder_ln_eps: float = 1e-5
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    dtype: Dtype = jnp.float32
    encoder_drop_path_rate: float = 0.0
    encoder_remat: bool = False
    decoder_remat: bool = False

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def depth(self) -> int:
        """The image encoder's depth (`optim` layer decay over `image_encoder/`)."""
        return self.encoder_depth

    def setup(self):
        if self.img_size % self.patch_size or self.pretrain_img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} / pretrain_img_size {self.pretrain_img_size} "
                             f"must be multiples of the patch size {self.patch_size}")
        e = self.embedding_size
        self.image_encoder = ImageEncoderViT(
            img_size=self.img_size, pretrain_img_size=self.pretrain_img_size, patch_size=self.patch_size,
            embed_dim=self.encoder_embed_dim, depth=self.encoder_depth, num_heads=self.encoder_num_heads,
            mlp_ratio=self.mlp_ratio, out_chans=self.prompt_embed_dim, window_size=self.window_size,
            global_attn_indexes=self.encoder_global_attn_indexes, ln_eps=self.encoder_ln_eps, dtype=self.dtype,
            drop_path_rate=self.encoder_drop_path_rate, remat=self.encoder_remat)
        self.prompt_encoder = PromptEncoder(
            embed_dim=self.prompt_embed_dim, image_embedding_size=(e, e),
            input_image_size=(self.img_size, self.img_size), mask_in_chans=self.mask_in_chans, dtype=self.dtype)
        # argument 6 of MaskDecoder.__call__ (self = 0): multimask_output, static
        decoder = nn.remat(MaskDecoder, static_argnums=(6,)) if self.decoder_remat else MaskDecoder
        self.mask_decoder = decoder(
            transformer_dim=self.prompt_embed_dim, num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth, iou_head_hidden_dim=self.iou_head_hidden_dim,
            depth=self.decoder_depth, num_heads=self.decoder_num_heads, mlp_dim=self.decoder_mlp_dim,
            attention_downsample_rate=self.attention_downsample_rate, ln_eps=self.decoder_ln_eps,
            dtype=self.dtype)

    def embed_image(self, images: jax.Array, input_hw: jax.Array, train: bool = False) -> jax.Array:
        """Image embeddings (`train`: the encoder's drop path, with a 'dropout' rng).

        images: (B, S, S, 3) float32 RGB 0-255, the resized image at the top-left;
          pixels outside input_hw are ignored.
        input_hw: (B, 2) int32 (h, w) of the resized image.
        Returns: (B, S/P, S/P, C) float32.
        """
        s = self.img_size
        if images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must be (B, {s}, {s}, 3), got {images.shape}")
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        x = (images.astype(jnp.float32) - mean) / std
        idx = jnp.arange(s)
        hw = jnp.asarray(input_hw, jnp.int32)
        inside = (idx[None, :, None] < hw[:, 0, None, None]) & (idx[None, None, :] < hw[:, 1, None, None])
        x = jnp.where(inside[..., None], x, 0.0)  # the reference pads after normalising
        return self.image_encoder(x, train)

    def predict_masks(self, image_embeddings: jax.Array, coords: jax.Array, labels: jax.Array,
                      mask_input: jax.Array | None = None, has_mask: jax.Array | None = None,
                      multimask_output: bool | None = True) -> dict[str, jax.Array]:
        """Masks for P prompts per image.

        image_embeddings: (B, h, w, C).
        coords: (B, P, T, 2) float32 (x, y) in the resized-input frame (no +0.5).
        labels: (B, P, T) int32: 1 pos, 0 neg, -1 not-a-point, 2/3 box corners,
          -10 absent (masked out everywhere: padding for static shapes).
        mask_input: (B, P, 4h, 4w, 1) float32 low-res logits, or None.
        has_mask: (B, P) bool (False -> no_mask_embed), or None (all True when
          mask_input is given).
        multimask_output: static; True -> masks 1..3, False -> mask 0, None -> masks
          0..3 (both outputs from one decoder run, as the training rollout's first round
          needs them).
        Returns: dict(low_res_logits (B, P, M, 4h, 4w) float32, iou_predictions (B, P, M)).
        """
        b, h, w, c = image_embeddings.shape
        _, p, t = labels.shape
        if coords.shape != (b, p, t, 2):
            raise ValueError(f"coords {coords.shape} do not match labels {labels.shape} (B={b})")
        sparse = self.prompt_encoder.embed_points(coords, labels)  # (B, P, T, C)
        token_mask = labels != ABSENT
        no_mask = self.prompt_encoder.no_mask()  # (C,)
        if mask_input is None:
            dense = no_mask
        else:
            if mask_input.shape != (b, p, 4 * h, 4 * w, 1):
                raise ValueError(f"mask_input must be {(b, p, 4 * h, 4 * w, 1)}, got {mask_input.shape}")
            dense = self.prompt_encoder.embed_masks(mask_input.reshape(b * p, 4 * h, 4 * w, 1))
            dense = dense.reshape(b, p, h, w, c)
            if has_mask is not None:
                dense = jnp.where(has_mask[:, :, None, None, None], dense, no_mask)
        masks, iou = self.mask_decoder(image_embeddings, dense, self.prompt_encoder.get_dense_pe(), sparse,
                                       token_mask, multimask_output)
        return dict(low_res_logits=masks, iou_predictions=iou)

    def __call__(self, images: jax.Array, input_hw: jax.Array, coords: jax.Array, labels: jax.Array,
                 mask_input: jax.Array | None = None, has_mask: jax.Array | None = None,
                 multimask_output: bool = True) -> dict[str, jax.Array]:
        """Both stages (creates every parameter at init: a missing mask_input is zeros with
        has_mask False). Returns predict_masks' dict plus image_embeddings."""
        emb = self.embed_image(images, input_hw)
        if mask_input is None:
            b, h, w, _ = emb.shape
            p = labels.shape[1]
            mask_input = jnp.zeros((b, p, 4 * h, 4 * w, 1), jnp.float32)
            has_mask = jnp.zeros((b, p), bool)
        out = self.predict_masks(emb, coords, labels, mask_input, has_mask, multimask_output)
        return dict(out, image_embeddings=emb)
