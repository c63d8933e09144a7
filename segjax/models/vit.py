"""Shared Vision Transformer blocks (MAE encoder/decoder, ViT classifier, SAM encoder).

Legend: B batch, L tokens, D width, N heads, K head dim, H/W spatial, P patch size.

Parameter names follow the timm / official MAE state_dict (`patch_embed.proj`,
`blocks.3.attn.qkv`, `mlp.fc1`, ...) with `.` between a list and its index replaced by
`_`, so a converter is a rename plus layout transposes. Parameters carry logical axis
names (`embed`, `mlp`, `heads`); `segjax/sharding.py` maps them onto a mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torch's nn.Linear / nn.Conv2d use kaiming-uniform by default; MAE and timm re-init
# Linear with xavier-uniform and zero bias, and the patch projection as a flattened
# xavier-uniform. Matching the init matters for training recipes, not for parity.
dense_init = nn.initializers.xavier_uniform()


def _logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def sincos_posemb_2d(
    embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = False, order: str = "wh"
) -> np.ndarray:
    """Fixed 2D sin-cos position table, as MAE's `get_2d_sincos_pos_embed`.

    Args:
      embed_dim: D, divisible by 4.
      grid_h, grid_w: token grid size.
      cls_token: prepend a zero row for the class token.
      order: "wh" is the official MAE / timm channel order (first half of the channels
        encodes the column w, a consequence of `meshgrid(grid_w, grid_h)`); "hw" is the
        order that transformers 5.x builds (halves swapped).
    Returns:
      (grid_h * grid_w [+ 1], D) float32, rows in raster (h-major) order.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    if order not in ("wh", "hw"):
        raise ValueError(f"order must be 'wh' or 'hw', got {order!r}")

    def _1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega  # (D/4,)
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D/2)

    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # (H, W)
    first, second = (ww, hh) if order == "wh" else (hh, ww)
    emb = np.concatenate([_1d(embed_dim // 2, first), _1d(embed_dim // 2, second)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth (per-sample residual drop), as timm's `drop_path`.

    x: (B, ...) residual branch output.
    """
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: images (B, H, W, C) -> (B, H/P * W/P, D)."""

    patch_size: int = 16
    embed_dim: int = 768
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch size {p}")
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(x)
        return einops.rearrange(x, "b h w d -> b (h w) d")


class Mlp(nn.Module):
    """Two-layer MLP `fc1 -> act -> fc2`; GELU is exact erf as torch's nn.GELU."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("embed", "mlp")),
            bias_init=_logical(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        x = gelu_erf(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        return nn.Dense(
            d,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("mlp", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written as torch's `nn.GELU` computes it.

    x: any shape -> same shape and dtype.
    """
    # NOTE: same function as `nn.gelu(x, approximate=False)`, but through erf instead of
    # erfc: `0.5 x (1 + erf(x / sqrt 2))` is torch's own formula, and XLA's erf is one
    # clamped rational polynomial while its erfc evaluates two branches and an exp.
    # Differences are float rounding (< 1.2e-6 absolute on |x| <= 12).
    return x * (0.5 * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (timm layout).

    x: (B, L, D) -> (B, L, D). The fused kernel's output axis splits as (3, N, K),
    matching torch's `qkv.weight [3D, D]`.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
        qkv = nn.Dense(
            3 * d,
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("embed", "heads")),
            bias_init=_logical(nn.initializers.zeros, ("heads",)),
            name="qkv",
        )(x)
        q, k, v = einops.rearrange(qkv, "b l (t n k) -> t b l n k", t=3, n=self.num_heads)
        out = dot_product_attention(q, k, v)  # (B, L, N, K)
        out = einops.rearrange(out, "b l n k -> b l (n k)")
        return nn.Dense(
            d,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("heads", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(out)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v with the softmax in float32.

    q, k, v: (B, L, N, K) -> (B, L, N, K).
    """
    # NOTE: heads-major einsums on explicitly rearranged operands. XLA:CPU moves the
    # batch dims (B, N) first for its batched dots either way; spelling the transposes
    # out lets it fold the 1/sqrt(K) scale into the copy of q and keeps every
    # intermediate (B, N, L, *) row-major. ~15% less attention time on XLA:CPU
    # (benchmarks/mae_train_step.py); identical math, rounding aside.
    q, k, v = (einops.rearrange(t, "b l n k -> b n l k") for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bnqk,bnsk->bnqs", q * jnp.asarray(scale, q.dtype), k)
    # NOTE: softmax in fp32 even under bf16 compute (reduced-precision softmax is
    # a known source of divergence for large-token attention).
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqs,bnsk->bnqk", probs, v)
    return einops.rearrange(out, "b n l k -> b l n k")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

    x: (B, L, D) -> (B, L, D).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        ln = dict(epsilon=self.ln_eps, dtype=self.dtype,
                  scale_init=_logical(nn.initializers.ones, ("embed",)),
                  bias_init=_logical(nn.initializers.zeros, ("embed",)))
        use_dp = train and self.drop_path_rate > 0.0

        y = Attention(self.num_heads, self.qkv_bias, self.dtype, name="attn")(
            nn.LayerNorm(name="norm1", **ln)(x))
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        x = x + y
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(nn.LayerNorm(name="norm2", **ln)(x))
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        x = x + y
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def layer_norm(name: str, eps: float = 1e-6, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """A LayerNorm whose scale/bias are sharded like the residual stream."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, name=name,
        scale_init=_logical(nn.initializers.ones, ("embed",)),
        bias_init=_logical(nn.initializers.zeros, ("embed",)))


def fixed_param(module: nn.Module, name: str, value: np.ndarray, names: tuple) -> jax.Array:
    """A parameter initialised to `value`; callers use it through `stop_gradient`.

    MAE stores its sin-cos tables as frozen parameters (`requires_grad=False`); keeping
    them as parameters lets a converted checkpoint carry its own table (transformers
    uses another channel order). `segjax.optim` freezes them by name as well.
    """
    return module.param(name, _logical(lambda *_: jnp.asarray(value), names))
