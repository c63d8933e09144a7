"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Legend: B images, P prompts per image, T tokens per prompt, L = h * w image tokens,
C width, N heads, K head dim.

Prompts of one image share its image tokens: a tensor with P = 1 on the prompt axis
broadcasts over the prompts, so the work that only depends on the image (layer 0's
key / value projections of the image tokens) runs once per image, not once per prompt
as in the reference (which repeats the embedding per prompt). Same arithmetic per
element.

Token masking (ours): `token_mask` (B, P, T) marks the real tokens; padded ones are
removed as keys from token self-attention and from image -> token cross-attention, so a
prompt padded to a static length gives the outputs of the unpadded one (the padded
tokens' own outputs are meaningless and unused).
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def decoder_layer_norm(name: str, eps: float) -> nn.LayerNorm:
    """torch nn.LayerNorm in float32 (two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def _prompt_spec(x: jax.Array) -> str:
    # 'p' when the tensor has its own prompt axis, '' when it is shared (P = 1)
    return "p" if x.shape[1] > 1 else ""


class Attention(nn.Module):
    """Attention with separate q/k/v projections to an internal width C / downsample_rate.

    q (B, Pq, Tq, C), k / v (B, Pk, Tk, C), key_mask (B, Pk, Tk) bool or None ->
    (B, max(Pq, Pk), Tq, C); Pq, Pk in {1, P} (1 broadcasts over the prompts).
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_mask: jax.Array | None = None) -> jax.Array:
        c = q.shape[-1]
        internal = c // self.downsample_rate
        if internal % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide the internal width {internal}")

        def proj(x, name, out=internal):
            return nn.Dense(out, dtype=self.dtype, name=name)(x)

        def heads(x, name):  # (B, P?, T, C) -> (B, P?, N, T, K), P? squeezed when shared
            x = einops.rearrange(proj(x, name), "b p l (n k) -> b p n l k", n=self.num_heads)
            return x if x.shape[1] > 1 else x[:, 0]

        pq, pk = _prompt_spec(q), _prompt_spec(k)
        p_out = "p" if (pq or pk) else ""
        q, k, v = heads(q, "q_proj"), heads(k, "k_proj"), heads(v, "v_proj")
        logits = jnp.einsum(f"b{pq}nqk,b{pk}nsk->b{p_out}nqs", q, k).astype(jnp.float32)
        logits = logits / math.sqrt(q.shape[-1])  # the reference divides after the matmul
        if key_mask is not None:
            m = key_mask if pk else key_mask[:, 0]  # (B, P?, Tk)
            m = m[:, :, None, None, :] if pk else m[:, None, None, :]
            if p_out and not pk:
                m = m[:, None]
            logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # fp32 softmax
        out = jnp.einsum(f"b{p_out}nqs,b{pk}nsk->b{p_out}nqk", probs, v)
        out = einops.rearrange(out, "b p n l k -> b p l (n k)" if p_out else "b n l k -> b 1 l (n k)")
        return proj(out, "out_proj", c)


class MLPBlock(nn.Module):
    """lin1 -> ReLU -> lin2. x (..., C) -> (..., C)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="lin2")(y)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token -> image cross-attn, token MLP, image -> token cross-attn,
    each followed by a LayerNorm (post-norm).

    queries (B, P, T, C), keys (B, 1 or P, L, C), query_pe (B, P, T, C), key_pe
    (1, 1, L, C), token_mask (B, P, T) -> (queries (B, P, T, C), keys (B, P, L, C)) float32.
    """

    num_heads: int
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_mask):
        n, r, dt = self.num_heads, self.attention_downsample_rate, self.dtype
        if self.skip_first_layer_pe:
            queries = Attention(n, 1, dt, name="self_attn")(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + Attention(n, 1, dt, name="self_attn")(q, q, queries, token_mask)
        queries = decoder_layer_norm("norm1", self.ln_eps)(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(n, r, dt, name="cross_attn_token_to_image")(q, k, keys)
        queries = decoder_layer_norm("norm2", self.ln_eps)(queries)

        queries = queries + MLPBlock(self.mlp_dim, dt, name="mlp")(queries)
        queries = decoder_layer_norm("norm3", self.ln_eps)(queries)

        q, k = queries + query_pe, keys + key_pe
        keys = keys + Attention(n, r, dt, name="cross_attn_image_to_token")(k, q, queries, token_mask)
        keys = decoder_layer_norm("norm4", self.ln_eps)(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image_embedding (B, 1 or P, L, C), image_pe (1, 1, L, C), point_embedding
    (B, P, T, C), token_mask (B, P, T) bool -> (queries (B, P, T, C), keys (B, P, L, C))
    float32.

    `ln_eps` is the blocks' LayerNorm eps (torch default 1e-5 in the reference; the
    Hugging Face port uses its config's 1e-6); the final norm is always 1e-5.
    """

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding, token_mask):
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                skip_first_layer_pe=(i == 0), ln_eps=self.ln_eps, dtype=self.dtype,
                name=f"layers_{i}")(queries, keys, point_embedding, image_pe, token_mask)
        q, k = queries + point_embedding, keys + image_pe
        queries = queries + Attention(self.num_heads, self.attention_downsample_rate, self.dtype,
                                      name="final_attn_token_to_image")(q, k, keys)
        return decoder_layer_norm("norm_final_attn", 1e-5)(queries), keys
