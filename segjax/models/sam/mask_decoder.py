"""SAM mask decoder: output tokens + prompt tokens through the two-way transformer, an
upscaled image embedding, hypernetwork MLPs that turn mask tokens into per-pixel
weights, and an IoU prediction head.

Legend: B batch (image x prompt pairs), T prompt tokens, C width, h/w embedding grid,
M masks (num_multimask_outputs + 1 before slicing).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.sam import init as torch_init
from segjax.models.sam.layer_norm import LayerNorm
from segjax.models.sam.prompt_broadcast import broadcast_prompts
from segjax.models.sam.transformer import DenseParams, TwoWayTransformer
from segjax.models.vit import gelu_erf

Dtype = Any


class PatchConvTranspose(nn.Module):
    """ConvTranspose2d with kernel_size == stride (non-overlapping): each input pixel
    writes one k x k output patch. x (N, ..., I) -> (N, ..., k, k, O) (`blocked`: the
    patch row / column offsets as two new axes before the channels), or for x (B, H, W, I)
    without `blocked` the spatial image (B, kH, kW, O).

    out[k*i + a, k*j + b, o] = sum_c x[i, j, c] kernel[a, b, c, o] + bias[o]; kernel
    (k, k, I, O) is torch's ConvTranspose2d weight [I, O, k, k] transposed (2, 3, 0, 1),
    no spatial flip (torch's transposed conv scatters without flipping). Computed as one
    matmul (.., I) @ (I, k*k*O): XLA:CPU's transposed convolution and a matmul whose
    output needs an interleaving transpose are both several times slower, so callers
    that go on per pixel keep the blocked layout and rearrange only the final result.
    """

    features: int
    kernel_size: int = 2
    dtype: Dtype = jnp.float32
    blocked: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        # NOTE: torch's ConvTranspose2d init (fan_in = O k k, segjax.models.sam.init)
        kernel = self.param("kernel", torch_init.CONV_TRANSPOSE_KERNEL, (k, k, c, self.features))
        bias = self.param("bias", torch_init.bias(k * k * self.features), (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        w = einops.rearrange(kernel, "p q c o -> c (p q o)")
        y = jnp.dot(x, w).reshape(*x.shape[:-1], k, k, self.features) + bias.astype(self.dtype)
        if self.blocked:
            return y
        return einops.rearrange(y, "b h w p q o -> b (h p) (w q) o")


class MLPParams(nn.Module):
    """The parameters of an MLP of `num_layers` nn.Dense layers `layers_0` ..
    `layers_{n-1}` (widths hidden_dim, ..., output_dim) over inputs of width `in_dim`,
    returned unapplied: [(kernel, bias)] per layer, run by `mlp`. Unapplied so that the
    mask decoder holds every hypernetwork's parameters and runs only those of the masks
    it returns."""

    hidden_dim: int
    output_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, in_dim: int) -> list[tuple[jax.Array, jax.Array]]:
        dims = [in_dim] + [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        return [DenseParams(o, name=f"layers_{i}")(d) for i, (d, o) in enumerate(zip(dims[:-1], dims[1:]))]


def mlp(layers: list[tuple[jax.Array, jax.Array]], x: jax.Array, dtype: Dtype) -> jax.Array:
    """The layers (as nn.Dense computes them, in `dtype`) with ReLU between them.
    x (..., I) -> (..., output_dim)."""
    for i, (kernel, bias) in enumerate(layers):
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        x = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias.reshape(
            (1,) * (x.ndim - 1) + (-1,))
        if i < len(layers) - 1:
            x = nn.relu(x)
    return x


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from an image embedding and prompt tokens.

    __call__(image_embeddings (B, h, w, C), dense (B, P, h, w, C) or (C,) (one embedding
    for every pixel: no mask input), image_pe (h, w, C), sparse (B, P, T, C), token_mask
    (B, P, T) bool, multimask_output (static: True, False or None)) -> (masks
    (B, P, M', 4h, 4w) float32, iou (B, P, M') float32), M' = masks 1..3 with
    multimask_output else mask 0, exactly the reference slicing; None: all masks 0..3
    (ours: both of the reference's outputs from one call, mask 0 first; the masks share
    every computation but their hypernetwork, so this equals the two calls).
    """

    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeddings, dense, image_pe, sparse, token_mask, multimask_output: bool | None = True):
        c, dt = self.transformer_dim, self.dtype
        n_masks = self.num_multimask_outputs + 1
        b, h, w, _ = image_embeddings.shape
        p = sparse.shape[1]
        iou_token = nn.Embed(1, c, embedding_init=torch_init.EMBEDDING, name="iou_token")(jnp.arange(1))  # (1, C)
        mask_tokens = nn.Embed(n_masks, c, embedding_init=torch_init.EMBEDDING, name="mask_tokens")(
            jnp.arange(n_masks))  # (M, C)
        out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(jnp.float32)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(out_tokens, (b, p, 1 + n_masks, c)), sparse.astype(jnp.float32)], axis=2)
        mask = jnp.concatenate([jnp.ones((b, p, 1 + n_masks), bool), token_mask], axis=2)

        if dense.ndim == 1:  # no mask input: one image tensor shared by the prompts (P = 1)
            src = (image_embeddings + dense)[:, None]
        else:  # (B, P, h, w, C); the embedding's gradient summed over P by halving adds
            src = broadcast_prompts(image_embeddings[:, None], p) + dense
        src = src.astype(jnp.float32).reshape(b, src.shape[1], h * w, c)
        pos = image_pe.astype(jnp.float32).reshape(1, 1, h * w, c)
        # only the masks asked for: 1..3 with multimask_output, 0 without, all with None. The
        # final attention runs for the IoU token and those mask tokens, and only their
        # hypernetworks run
        sel = (tuple(range(n_masks)) if multimask_output is None
               else tuple(range(1, n_masks)) if multimask_output else (0,))
        hs, src = TwoWayTransformer(self.depth, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                                    self.ln_eps, dt, name="transformer")(
            src, pos, tokens, mask, outputs=(0,) + tuple(1 + i for i in sel))
        src = jnp.broadcast_to(src, (b, p, h * w, c))  # per prompt from layer 0's image -> token step on
        iou_token_out = hs[:, :, 0]  # (B, P, C)

        # upscaling in the blocked layout (B*P, h, w, a, b, a', b', C/8): output pixel
        # (4i + 2a + a', 4j + 2b + b'); only the masks asked for are multiplied out
        hypernetworks = [MLPParams(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}")(c) for i in range(n_masks)]
        hyper_in = jnp.stack([mlp(hypernetworks[i], hs[:, :, 1 + j], dt) for j, i in enumerate(sel)], axis=2)
        hyper_in = hyper_in.reshape(b * p, len(sel), c // 8)  # (B*P, M', C/8)
        up0 = PatchConvTranspose(c // 4, 2, dt, blocked=True, name="output_upscaling_0")
        ln = LayerNorm(1e-6, name="output_upscaling_1")  # LayerNorm2d on the blocked NHWC layout
        up3 = PatchConvTranspose(c // 8, 2, dt, blocked=True, name="output_upscaling_3")

        x = gelu_erf(ln(up0(src.reshape(b * p, h, w, c))))
        x = gelu_erf(up3(x))  # (B*P, h, w, 2, 2, 2, 2, C/8)
        masks = jnp.einsum("nmk,nhwabcdk->nhwabcdm", hyper_in.astype(dt), x.astype(dt)).astype(jnp.float32)
        masks = einops.rearrange(masks, "n h w a b c d m -> n m (h a c) (w b d)")
        iou_head = MLPParams(self.iou_head_hidden_dim, n_masks, self.iou_head_depth, name="iou_prediction_head")
        iou_pred = mlp(iou_head(c), iou_token_out, dt).astype(jnp.float32)
        masks = masks.reshape(b, p, masks.shape[1], 4 * h, 4 * w)
        return masks, iou_pred[:, :, sel[0]: sel[-1] + 1]
