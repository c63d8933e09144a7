"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Legend: B images, P prompts per image, T tokens per prompt (Tq queries, Tk keys), L = h * w
image tokens, C width, I = C / downsample_rate internal width, N heads, K = I / N head dim.

Prompts of one image share its image tokens: a tensor with P = 1 on the prompt axis
broadcasts over the prompts, so the work that depends only on the image runs once per
image, not once per prompt as in the reference (which repeats the embedding per prompt).

Attention is `attention`, the paper's (segment-anything's `modeling/transformer.py`):
project q, k, v, separate the heads, softmax(q k^T / sqrt K) v, recombine the heads,
project out. `Attention` computes it in one of the equal forms below, chosen from the
static shapes; each form is tested against it (tests/models/test_sam_attention.py):
  - `attention_divide_late`: token self-attention, and token -> image attention over
    image tokens shared by the prompts (layer 0).
  - `image_to_token_shared_queries`: image -> token attention whose image queries are
    shared by the prompts (layer 0).
  - `image_to_token_folded`: image -> token attention whose image queries are per
    prompt (the later layers).
  - `token_to_image_folded`: token -> image attention over per-prompt image tokens
    (the later layers and the final attention).
With many prompts per image, the products over the L x C image tokens are most of the
decoder's work. The folds make them products with small matrices built from the prompt
tokens: the image tokens are never projected per prompt, and they stay the row-major
left operand, so XLA:CPU does not transpose them.

Token masking (ours): `token_mask` (B, P, T) marks the real tokens; padded ones are
removed as keys from token self-attention and from image -> token cross-attention, so a
prompt padded to a static length gives the outputs of the unpadded one (the padded
tokens' own outputs are meaningless and unused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.sam import init as torch_init
from segjax.models.sam.layer_norm import LayerNorm
from segjax.models.sam.prompt_broadcast import broadcast_prompts

Dtype = Any


def decoder_layer_norm(name: str, eps: float) -> LayerNorm:
    """torch nn.LayerNorm in float32 (two-pass variance; `segjax.models.sam.layer_norm`)."""
    return LayerNorm(eps, name=name)


class DenseParams(nn.Module):
    """The parameters of an `nn.Dense(features)` over inputs of width `in_dim` (same
    names and shapes; torch's nn.Linear init), returned unapplied: kernel (in_dim, features), bias
    (features,)."""

    features: int

    @nn.compact
    def __call__(self, in_dim: int) -> tuple[jax.Array, jax.Array]:
        # NOTE: torch's nn.Linear init (segjax.models.sam.init), not flax's nn.Dense default
        kernel = self.param("kernel", torch_init.KERNEL, (in_dim, self.features))
        bias = self.param("bias", torch_init.bias(in_dim), (self.features,))
        return kernel, bias


class AttentionWeights(NamedTuple):
    """Projections: wq, wk, wv (C, I) with bq, bk, bv (I,); wo (I, C) with bo (C,)."""

    wq: jax.Array
    bq: jax.Array
    wk: jax.Array
    bk: jax.Array
    wv: jax.Array
    bv: jax.Array
    wo: jax.Array
    bo: jax.Array


# ----------------------------------------------------------------------------- the reference


def attention(q: jax.Array, k: jax.Array, v: jax.Array, w: AttentionWeights, num_heads: int,
              key_mask: jax.Array | None = None) -> jax.Array:
    """The paper's attention: softmax((q Wq + bq)_n (k Wk + bk)_n^T / sqrt K) (v Wv + bv)_n
    per head n, heads concatenated, then Wo + bo.

    q (B, Pq, Tq, C), k / v (B, Pk, Tk, C) (a prompt axis of 1 broadcasts), key_mask
    (B, Pk, Tk) bool or None (False: the key is left out) -> (B, max(Pq, Pk), Tq, C).
    """
    p = max(q.shape[1], k.shape[1])

    def separate_heads(x):  # (B, P?, T, I) -> (B, P, N, T, K)
        x = jnp.broadcast_to(x, (x.shape[0], p, *x.shape[2:]))
        return x.reshape(*x.shape[:-1], num_heads, -1).swapaxes(-2, -3)

    qh, kh, vh = (separate_heads(x @ wx + bx) for x, wx, bx in ((q, w.wq, w.bq), (k, w.wk, w.bk), (v, w.wv, w.bv)))
    logits = (qh @ kh.swapaxes(-1, -2)).astype(jnp.float32) / math.sqrt(qh.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask[:, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
    out = jax.nn.softmax(logits, axis=-1).astype(q.dtype) @ vh
    out = out.swapaxes(-2, -3)  # (B, P, Tq, N, K)
    return out.reshape(*out.shape[:-2], -1) @ w.wo + w.bo


# ----------------------------------------------------------------------------- equal forms


def _prompt_spec(x: jax.Array) -> str:
    # 'p' when the tensor has its own prompt axis, '' when it is shared (P = 1)
    return "p" if x.shape[1] > 1 else ""


def _squeeze_shared(x: jax.Array) -> jax.Array:
    return x if x.shape[1] > 1 else x[:, 0]


def _heads(x: jax.Array, kernel: jax.Array, bias: jax.Array, num_heads: int) -> jax.Array:
    """x (B, P, T, C) projected and split: (B, P?, T, N, K), P? squeezed when shared."""
    return _squeeze_shared((x @ kernel + bias).reshape(*x.shape[:-1], num_heads, -1))


def _mask_logits(logits: jax.Array, key_mask: jax.Array | None, pk: str) -> jax.Array:
    """logits (B, N, P?, Tq, Tk) (P? absent when no operand has a prompt axis), key_mask
    (B, Pk, Tk) bool or None -> masked logits (masked keys at the float32 minimum)."""
    if key_mask is None:
        return logits
    m = (key_mask if pk else key_mask[:, :1])[:, None, :, None, :]  # (B, 1, Pk, 1, Tk)
    if logits.ndim == 4:
        m = m[:, :, 0]
    return jnp.where(m, logits, jnp.finfo(jnp.float32).min)


def softmax_divide_late(logits: jax.Array, axis: int, product: Callable[[jax.Array], jax.Array],
                        dtype: Dtype) -> jax.Array:
    """product(softmax(s)) = product(exp(s - max s)) / sum exp(s - max s), for `product`
    linear in the probabilities.

    logits (float32), softmax over `axis`; product(e) contracts e's `axis` and returns
    e's other axes in order followed by the value axis -> that, in `dtype`. The division
    runs on the product's output (Tq K or N Tq C values) instead of on the probabilities
    (Tq Tk or L N Tq): XLA:CPU would otherwise write the normalised probabilities once
    more, in the layout the product reads them in.
    """
    # the max only keeps exp in range: softmax does not depend on it, so no gradient
    # through it (exactly zero in exact arithmetic; as jax.nn.softmax)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis, keepdims=True)))
    return (product(e.astype(dtype)) / jnp.moveaxis(e.sum(axis, keepdims=True), axis, -1)).astype(dtype)


def attention_divide_late(q: jax.Array, k: jax.Array, v: jax.Array, w: AttentionWeights, num_heads: int,
                          key_mask: jax.Array | None = None) -> jax.Array:
    """`attention` with the softmax's division after the value product
    (`softmax_divide_late`): softmax(s) v = (exp(s - max s) v) / sum exp(s - max s).

    Shapes as `attention`. Heads go ahead of the prompts: per head one (P Tq, K) @ (K, Tk)
    product and one (P Tq, Tk) @ (Tk, K) back, with no transpose of the probabilities.
    """
    n, dt = num_heads, q.dtype
    pq, pk = _prompt_spec(q), _prompt_spec(k)
    po = "p" if (pq or pk) else ""
    qh = _heads(q, w.wq, w.bq, n)  # (B, P?, Tq, N, K)
    kh, vh = (jnp.moveaxis(_heads(x, wx, bx, n), -2, -3) for x, wx, bx in ((k, w.wk, w.bk), (v, w.wv, w.bv)))
    logits = jnp.einsum(f"b{pq}qnk,b{pk}nsk->bn{po}qs", qh, kh).astype(jnp.float32) / math.sqrt(qh.shape[-1])
    logits = _mask_logits(logits, key_mask, pk)  # (B, N, P?, Tq, Tk)
    o = softmax_divide_late(logits, -1, lambda e: jnp.einsum(f"bn{po}qs,b{pk}nsk->bn{po}qk", e, vh), dt)
    o = jnp.moveaxis(o, 1, -2)  # (B, P?, Tq, N, K)
    out = o.reshape(*o.shape[:-2], -1) @ w.wo + w.bo
    return out if po else out[:, None]


def folded_value_output(logits: jax.Array, vh: jax.Array, w: AttentionWeights) -> jax.Array:
    """Softmax over the keys, then the output projection folded into the values:
    concat_n(p_n v_n) Wo + bo = sum_n p_n (v_n Wo_n) + bo.

    logits (B, P?, L, Tk, N) unscaled, vh (B, Pk?, Tk, N, K) the projected values ->
    (B, P, L, C). With few keys (N Tk < I) the L queries' output is one (L, N Tk) @
    (N Tk, C) product, without an (L, I) intermediate. The (token, head) column order
    puts the softmax over Tk on vectors of N heads instead of a short minor axis.
    """
    tk, n, hd = vh.shape[-3:]
    c = w.wo.shape[1]
    pk, po = ("p" if vh.ndim == 5 else ""), ("p" if logits.ndim == 5 else "")
    logits = logits.astype(jnp.float32) / math.sqrt(hd)
    probs = jax.nn.softmax(logits, axis=-2).astype(vh.dtype)  # (B, P?, L, Tk, N)
    probs = probs.reshape(*probs.shape[:-2], tk * n)
    vo = jnp.einsum(f"b{pk}tnk,nkc->b{pk}tnc", vh, w.wo.reshape(n, hd, c))
    vo = vo.reshape(*vo.shape[:-3], tk * n, c)  # (B, P?, Tk N, C)
    out = jnp.einsum(f"b{po}lm,b{pk}mc->b{po}lc", probs, vo) + w.bo
    return out if po else out[:, None]


def image_to_token_shared_queries(q: jax.Array, k: jax.Array, v: jax.Array, w: AttentionWeights, num_heads: int,
                                  key_mask: jax.Array | None = None) -> jax.Array:
    """Image -> token attention whose image queries are the same for every prompt
    (layer 0): q_p = q for all p, so q Wq + bq is projected once per image; the output
    through `folded_value_output`.

    q (B, 1, L, C), k / v (B, P, Tk, C), key_mask (B, P, Tk) or None -> (B, P, L, C).
    Per prompt the logits then cost L N Tk K multiply-adds (`image_to_token_folded`'s
    cost L C N Tk, C / K times more).
    """
    n = num_heads
    kh, vh = _heads(k, w.wk, w.bk, n), _heads(v, w.wv, w.bv, n)  # (B, P, Tk, N, K)
    logits = jnp.einsum("blnk,bptnk->bpltn", _heads(q, w.wq, w.bq, n), kh)  # (B, P, L, Tk, N)
    if key_mask is not None:
        logits = logits + jnp.where(key_mask[:, :, None, :, None], 0.0, -jnp.inf).astype(logits.dtype)
    return folded_value_output(logits, vh, w)


def image_to_token_folded(q: jax.Array, k: jax.Array, v: jax.Array, w: AttentionWeights, num_heads: int,
                          key_mask: jax.Array | None = None) -> jax.Array:
    """Image -> token attention with the query projection folded into the keys:
    (q Wq + bq)_n k_n^T = q (Wq_n k_n^T) + bq_n k_n^T; the output through
    `folded_value_output`.

    q (B, Pq, L, C), k / v (B, Pk, Tk, C), key_mask (B, Pk, Tk) or None -> (B, P, L, C).
    The L image queries are never projected: per prompt ~2 L C N Tk multiply-adds
    instead of ~2 L C I, fewer when N Tk < I. Masked keys enter as -inf in the bias row
    bq_n k_n^T (no pass over the logits).
    """
    n, c = num_heads, q.shape[-1]
    pq, pk = _prompt_spec(q), _prompt_spec(k)
    po = "p" if (pq or pk) else ""
    kh, vh = _heads(k, w.wk, w.bk, n), _heads(v, w.wv, w.bv, n)  # (B, P?, Tk, N, K)
    km = None if key_mask is None else (key_mask if pk else key_mask[:, 0])
    tk, hd = kh.shape[-3], kh.shape[-1]
    a = jnp.einsum(f"cnk,b{pk}tnk->b{pk}ctn", w.wq.reshape(c, n, hd), kh)
    a = a.reshape(*a.shape[:-2], tk * n)  # (B, P?, C, Tk N), columns ordered (token, head)
    qb = jnp.einsum(f"nk,b{pk}tnk->b{pk}tn", w.bq.reshape(n, hd), kh)  # (B, P?, Tk, N)
    if km is not None:
        qb = qb + jnp.where(km[..., :, None], 0.0, -jnp.inf).astype(qb.dtype)
    qb = qb.reshape(*a.shape[:-2], 1, tk * n)
    logits = jnp.einsum(f"b{pq}lc,b{pk}cm->b{po}lm", _squeeze_shared(q), a) + qb
    return folded_value_output(logits.reshape(*logits.shape[:-1], tk, n), vh, w)


def positional_logits(k_pe: jax.Array, a: jax.Array) -> jax.Array:
    """The positional encoding's term of `token_to_image_folded`'s logits:
    (k + pe) a = k a + pe a.

    k_pe (B or 1, 1, L, C) shared by the prompts, a (B, P?, C, N Tq) -> pe a (B, P?, L,
    N Tq): one (L, C) @ (C, P N Tq) product, with no k + pe materialised per prompt.
    """
    pq = "p" if a.ndim == 4 else ""
    kp = k_pe[:, 0].astype(a.dtype)
    kb = "" if kp.shape[0] == 1 else "b"
    return jnp.einsum(f"{kb}lc,b{pq}cm->b{pq}lm", kp[0] if not kb else kp, a)


def token_to_image_folded(q: jax.Array, k: jax.Array, v: jax.Array, w: AttentionWeights, num_heads: int,
                          k_pe: jax.Array | None = None) -> jax.Array:
    """Token -> image attention with the key projection folded into the queries and the
    value projection after the value product:
    softmax(q_n (k Wk + bk)_n^T / sqrt K) (v Wv + bv)_n
    = softmax((q_n Wk_n^T) k^T / sqrt K) v Wv_n + bv_n
    (q_n . bk_n is the same for every key, which softmax drops; the probabilities sum to 1).

    q (B, Pq, Tq, C), k / v (B, Pk, L, C) with Pk = P unless Pq = 1, k_pe (B or 1, 1, L,
    C) or None (the keys are k + k_pe; its term through `positional_logits`) ->
    (B, P, Tq, C). The L x C image tokens are never projected; they stay the row-major
    left operand (L, C) @ (C, N Tq); the softmax through `softmax_divide_late`.
    """
    n, c, dt = num_heads, q.shape[-1], q.dtype
    pq, pk = _prompt_spec(q), _prompt_spec(k)
    po = "p" if (pq or pk) else ""
    if k_pe is not None and (k_pe.shape[1] > 1 or pq != po):
        k, k_pe = k + k_pe.astype(dt), None
    tq = q.shape[2]
    qh = _heads(q, w.wq, w.bq, n)  # (B, P?, Tq, N, K)
    hd = qh.shape[-1]
    a = jnp.einsum(f"b{pq}tnk,cnk->b{pq}cnt", qh, w.wk.reshape(c, n, hd))
    a = a.reshape(*a.shape[:-2], n * tq)  # (B, P?, C, N Tq)
    logits = jnp.einsum(f"b{pk}lc,b{pq}cm->b{po}lm", _squeeze_shared(k), a)  # (B, P?, L, N Tq)
    if k_pe is not None:
        logits = logits + positional_logits(k_pe, a)
    ctx = softmax_divide_late(logits.astype(jnp.float32) / math.sqrt(hd), -2,
                              lambda e: jnp.einsum(f"b{po}lm,b{pk}lc->b{po}mc", e, _squeeze_shared(v)), dt)
    ctx = ctx.reshape(*ctx.shape[:-2], n, tq, c)  # (B, P?, N, Tq, C)
    o = jnp.einsum(f"b{po}ntc,cnk->b{po}tnk", ctx, w.wv.reshape(c, n, hd)) + w.bv.reshape(n, hd)
    out = o.reshape(*o.shape[:-2], -1) @ w.wo + w.bo
    return out if po else out[:, None]


class Attention(nn.Module):
    """`attention` with q / k / v projections to the internal width I = C /
    downsample_rate, computed in the equal form that the static shapes call for (see the
    module docstring), or as `attention` itself with `reference`.

    q (B, Pq, Tq, C), k / v (B, Pk, Tk, C), key_mask (B, Pk, Tk) bool or None, k_pe
    (B or 1, 1, Tk, C) or None (the keys are k + k_pe) -> (B, max(Pq, Pk), Tq, C);
    Pq, Pk in {1, P} (1 broadcasts over the prompts).
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32
    reference: bool = False

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None,
                 k_pe: jax.Array | None = None) -> jax.Array:
        c, n, dt = q.shape[-1], self.num_heads, self.dtype
        internal = c // self.downsample_rate
        if internal % n:
            raise ValueError(f"{n} heads do not divide the internal width {internal}")
        (wq, bq), (wk, bk), (wv, bv) = (DenseParams(internal, name=f"{x}_proj")(c) for x in "qkv")
        wo, bo = DenseParams(c, name="out_proj")(internal)
        w = AttentionWeights(*(x.astype(dt) for x in (wq, bq, wk, bk, wv, bv, wo, bo)))
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
        tq, tk, shared_q, shared_k = q.shape[2], k.shape[2], q.shape[1] == 1, k.shape[1] == 1
        if self.reference:
            form = attention
        elif n * tk < internal < tq:  # image -> token: many queries, few keys
            form = image_to_token_shared_queries if shared_q and not shared_k else image_to_token_folded
        elif n * tq < internal < tk and key_mask is None and (shared_q or not shared_k):  # token -> per-prompt image
            return token_to_image_folded(q, k, v, w, n, k_pe)
        else:
            form = attention_divide_late
        k = k if k_pe is None else k + k_pe.astype(dt)
        return form(q, k, v, w, n, key_mask)


class MLPBlock(nn.Module):
    """lin1 -> ReLU -> lin2. x (..., C) -> (..., C)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = nn.relu(nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=torch_init.KERNEL,
                             bias_init=torch_init.bias(c), name="lin1")(x))
        return nn.Dense(c, dtype=self.dtype, kernel_init=torch_init.KERNEL, bias_init=torch_init.bias(self.mlp_dim),
                        name="lin2")(y)


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
        update = Attention(n, r, dt, name="cross_attn_image_to_token")(k, q, queries, token_mask)
        keys = broadcast_prompts(keys, update.shape[1]) + update  # per prompt from here on
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
