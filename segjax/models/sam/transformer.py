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


class _Projection(nn.Module):
    """The parameters of an `nn.Dense(features)` over inputs of width `in_dim` (same
    names, shapes and init), returned unapplied: kernel (in_dim, features), bias
    (features,)."""

    features: int

    @nn.compact
    def __call__(self, in_dim: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_dim, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return kernel, bias


def _squeeze_shared(x: jax.Array) -> jax.Array:
    return x if x.shape[1] > 1 else x[:, 0]


def _mask_logits(logits: jax.Array, key_mask: jax.Array | None, pk: str) -> jax.Array:
    """logits (B, N, P?, Tq, Tk) (P? absent when no operand has a prompt axis), key_mask
    (B, Pk, Tk) bool or None -> masked logits (masked keys at the float32 minimum)."""
    if key_mask is None:
        return logits
    m = (key_mask if pk else key_mask[:, :1])[:, None, :, None, :]  # (B, 1, Pk, 1, Tk)
    if logits.ndim == 4:
        m = m[:, :, 0]
    return jnp.where(m, logits, jnp.finfo(jnp.float32).min)


class Attention(nn.Module):
    """Attention with separate q/k/v projections to an internal width C / downsample_rate.

    q (B, Pq, Tq, C), k / v (B, Pk, Tk, C), key_mask (B, Pk, Tk) bool or None ->
    (B, max(Pq, Pk), Tq, C); Pq, Pk in {1, P} (1 broadcasts over the prompts).

    Image -> token attention (Tq large, Tk small, N Tk < I: N heads, I internal width;
    N Tk = 56 < I = 128 in SAM's decoder) folds the projections of the image side into
    the token side (same function, other rounding): logits_n = q (Wq_n k_n^T) + bq_n k_n^T
    and out = sum_n probs_n (v_n Wo_n) + bo, never projecting the L image queries, which
    takes its per-prompt work from ~2 L C I to ~2 L C N Tk multiply-adds. When the image
    queries are shared by the prompts (layer 0) they are projected once per image
    instead, and the logits cost L N Tk K per prompt (16x less than the fold's L C N Tk);
    the output keeps the folded v_n Wo_n.

    Token -> image attention with per-prompt image tokens (layer 1 and the final
    attention: the image side has been updated per prompt) folds the same way:
    logits_n = (q_n Wk_n^T) k^T (q . bk is constant over the keys, which softmax drops)
    and out_n = (probs_n v) Wv_n + bv (the probabilities sum to 1). Both products keep
    the L x C image tokens as the row-major left operand (L, C) @ (C, N Tq), so XLA:CPU
    never transposes them; the unfolded k / v projections of 64 prompts' 4096 tokens
    and their head transposes were ~60% of the decoder's CPU time. Image tokens shared
    by several prompts (layer 0) are projected once, unfolded.
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None,
                 k_pe: jax.Array | None = None) -> jax.Array:
        """`k_pe` (B, 1, Tk, C) or None: the keys are k + k_pe. Passed apart, folded
        token -> image attention multiplies the shared positional encoding once for all
        prompts instead of materialising k + k_pe per prompt."""
        c = q.shape[-1]
        internal = c // self.downsample_rate
        n, dt = self.num_heads, self.dtype
        if internal % n:
            raise ValueError(f"{n} heads do not divide the internal width {internal}")
        hd = internal // n
        (wq, bq), (wk, bk), (wv, bv) = (_Projection(internal, name=f"{x}_proj")(c) for x in "qkv")
        wo, bo = _Projection(c, name="out_proj")(internal)
        wq, bq, wk, bk, wv, bv, wo, bo = (x.astype(dt) for x in (wq, bq, wk, bk, wv, bv, wo, bo))
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
        tq, tk = q.shape[2], k.shape[2]
        pq, pk = _prompt_spec(q), _prompt_spec(k)
        po = "p" if (pq or pk) else ""
        folded_t2i = n * tq < internal < tk and (pk or not pq)
        if k_pe is not None and not (folded_t2i and k_pe.shape[1] == 1 and pq == po):
            k, k_pe = k + k_pe.astype(dt), None
        scale = math.sqrt(hd)  # the reference divides after the matmul

        def heads(x, w, bias):  # (B, P, T, C) -> (B, P?, T, N, K), P? squeezed when shared
            return _squeeze_shared((x @ w + bias).reshape(*x.shape[:-1], n, hd))

        if n * tk < internal and tq > internal:  # image -> token
            # columns ordered (token, head): the softmax over the Tk tokens then runs on
            # vectors of N heads instead of reducing a minor axis of length Tk
            kh, vh = heads(k, wk, bk), heads(v, wv, bv)  # (B, P?, Tk, N, K)
            km = None if key_mask is None else (key_mask if pk else key_mask[:, 0])
            if pk and not pq:
                # image queries shared by the prompts (layer 0): projected once per image
                # (L C I multiply-adds), then L N Tk K per prompt, 16x less than the fold
                logits = jnp.einsum("blnk,bptnk->bpltn", heads(q, wq, bq), kh)  # (B, P, L, Tk, N)
                if km is not None:
                    logits = logits + jnp.where(km[:, :, None, :, None], 0.0, -jnp.inf).astype(logits.dtype)
            else:
                a = jnp.einsum(f"cnk,b{pk}tnk->b{pk}ctn", wq.reshape(c, n, hd), kh)
                a = a.reshape(*a.shape[:-2], tk * n)  # (B, P?, C, Tk N)
                qb = jnp.einsum(f"nk,b{pk}tnk->b{pk}tn", bq.reshape(n, hd), kh)  # (B, P?, Tk, N)
                if km is not None:  # masked keys: -inf in the bias row (no pass over the logits)
                    qb = qb + jnp.where(km[..., :, None], 0.0, -jnp.inf).astype(qb.dtype)
                qb = qb.reshape(*a.shape[:-2], 1, tk * n)
                logits = jnp.einsum(f"b{pq}lc,b{pk}cm->b{po}lm", _squeeze_shared(q), a) + qb
                logits = logits.reshape(*logits.shape[:-1], tk, n)
            logits = logits.astype(jnp.float32) / scale
            probs = jax.nn.softmax(logits, axis=-2).astype(dt)  # (B, P?, L, Tk, N)
            probs = probs.reshape(*probs.shape[:-2], tk * n)
            vo = jnp.einsum(f"b{pk}tnk,nkc->b{pk}tnc", vh, wo.reshape(n, hd, c))
            vo = vo.reshape(*vo.shape[:-3], tk * n, c)  # (B, P?, Tk N, C)
            out = jnp.einsum(f"b{po}lm,b{pk}mc->b{po}lc", probs, vo) + bo
        elif folded_t2i:  # token -> image tokens not shared by prompts
            qh = heads(q, wq, bq)  # (B, P?, Tq, N, K)
            a = jnp.einsum(f"b{pq}tnk,cnk->b{pq}cnt", qh, wk.reshape(c, n, hd))
            a = a.reshape(*a.shape[:-2], n * tq)  # (B, P?, C, N Tq)
            # q . bk is the same for every key: softmax drops it, so it is not added
            logits = jnp.einsum(f"b{pk}lc,b{pq}cm->b{po}lm", _squeeze_shared(k), a)  # (B, P?, L, N Tq)
            if k_pe is not None:  # (k + pe) a = k a + pe a, the latter one product for all prompts
                kp = k_pe[:, 0].astype(dt)
                kb = "" if kp.shape[0] == 1 else "b"
                logits = logits + jnp.einsum(f"{kb}lc,b{pq}cm->b{pq}lm", kp[0] if not kb else kp, a)
            logits = logits.astype(jnp.float32) / scale
            # softmax over the keys L, its division after the value product (on N Tq C
            # values, not the (L, N Tq) probabilities)
            e = jnp.exp(logits - logits.max(-2, keepdims=True))
            ctx = jnp.einsum(f"b{po}lm,b{pk}lc->b{po}mc", e.astype(dt), _squeeze_shared(v))
            ctx = (ctx / jnp.swapaxes(e.sum(-2, keepdims=True), -1, -2)).astype(dt)  # (B, P?, N Tq, C)
            # the probabilities sum to 1: sum_l p_l (v_l Wv + bv) = (sum_l p_l v_l) Wv + bv
            ctx = ctx.reshape(*ctx.shape[:-2], n, tq, c)
            o = jnp.einsum(f"b{po}ntc,cnk->b{po}tnk", ctx, wv.reshape(c, n, hd)) + bv.reshape(n, hd)
            out = o.reshape(*o.shape[:-2], internal) @ wo + bo
        else:
            qh = heads(q, wq, bq)
            kh, vh = (jnp.moveaxis(heads(x, w, bias), -2, -3) for x, w, bias in ((k, wk, bk), (v, wv, bv)))
            # heads ahead of the prompts: per head one (P Tq, K) @ (K, Tk) product and
            # (P Tq, Tk) @ (Tk, K) back. The softmax's division comes after the second
            # product (on Tq K values instead of Tq Tk): for layer 0's 4096 shared image
            # tokens XLA:CPU otherwise writes the normalised probabilities once more, in a
            # transposed layout (~2x the cost of this attention at 64 prompts)
            logits = jnp.einsum(f"b{pq}qnk,b{pk}nsk->bn{po}qs", qh, kh).astype(jnp.float32) / scale
            logits = _mask_logits(logits, key_mask, pk)
            e = jnp.exp(logits - logits.max(-1, keepdims=True))
            o = jnp.einsum(f"bn{po}qs,b{pk}nsk->bn{po}qk", e.astype(dt), vh) / e.sum(-1, keepdims=True)
            o = jnp.moveaxis(o.astype(dt), 1, -2)  # (B, P?, Tq, N, K)
            out = o.reshape(*o.shape[:-2], internal) @ wo + bo
        return out if po else out[:, None]


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
    def __call__(self, image_embedding, image_pe, point_embedding, token_mask,
                 outputs: tuple[int, ...] | None = None):
        """`outputs`: the tokens whose final outputs are wanted (all if None); the
        returned queries are (B, P, len(outputs), C). The final attention runs only for
        them: its queries do not interact (cross-attention), so the others' outputs are
        not needed (the mask decoder reads the IoU token and the mask tokens it returns,
        never the prompt tokens)."""
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                skip_first_layer_pe=(i == 0), ln_eps=self.ln_eps, dtype=self.dtype,
                name=f"layers_{i}")(queries, keys, point_embedding, image_pe, token_mask)
        if outputs is not None:
            idx = jnp.asarray(outputs)
            queries, point_embedding = queries[:, :, idx], point_embedding[:, :, idx]
        queries = queries + Attention(self.num_heads, self.attention_downsample_rate, self.dtype,
                                      name="final_attn_token_to_image")(queries + point_embedding, keys, keys,
                                                                        k_pe=image_pe)
        return decoder_layer_norm("norm_final_attn", 1e-5)(queries), keys
