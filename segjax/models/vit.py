"""Shared Vision Transformer blocks (MAE encoder/decoder, ViT classifier, SAM encoder).

Legend: B batch, L tokens, D width, N heads, K head dim, H/W spatial, P patch size.

Parameter names follow the timm / official MAE state_dict (`patch_embed.proj`,
`blocks.3.attn.qkv`, `mlp.fc1`, ...) with `.` between a list and its index replaced by
`_`, so a converter is a rename plus layout transposes. Parameters carry logical axis
names (`embed`, `mlp`, `heads`); `segjax/sharding.py` maps them onto a mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.rel_pos_attention import attend_block
from segjax.ops.resample import cubic_matrix, linear_matrix

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
    bias_init: Callable = nn.initializers.zeros

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
            bias_init=_logical(self.bias_init, ("embed",)),
            name="proj",
        )(x)
        return einops.rearrange(x, "b h w d -> b (h w) d")


def torch_conv_bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32, *, fan_in: int) -> jax.Array:
    """torch.nn.Conv2d's default bias: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Mlp(nn.Module):
    """Two-layer MLP `fc1 -> act -> fc2`; GELU is exact erf as torch's nn.GELU.

    `names` renames the two layers (SAM's image encoder calls them `lin1`, `lin2`).
    `act`: a key of `ACTIVATIONS` (transformers' `hidden_act` names).
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32
    names: tuple[str, str] = ("fc1", "fc2")
    act: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("embed", "mlp")),
            bias_init=_logical(nn.initializers.zeros, ("mlp",)),
            name=self.names[0],
        )(x)
        x = activation(self.act)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        return nn.Dense(
            d,
            dtype=self.dtype,
            kernel_init=_logical(dense_init, ("mlp", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name=self.names[1],
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


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# MLP activations by transformers' `hidden_act` name (its ACT2FN), each the same function
# as transformers' (float rounding aside). Names that differ only in how torch evaluates
# the same formula share one entry (the tanh GELUs, erf GELUs). Not here: activations
# with learned parameters (prelu, xielu).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,  # torch nn.GELU / F.gelu: exact erf
    "gelu_python": gelu_erf,
    "gelu_10": lambda x: jnp.clip(gelu_erf(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch's default slope
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * np.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The `ACTIVATIONS` entry `name`; a ValueError listing the choices otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported MLP activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


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
    # intermediate (B, N, L, *) row-major, which makes attention faster on XLA:CPU
    # (benchmarks/README.md); identical math, rounding aside.
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
    act: str = "gelu"  # MLP activation, a key of `ACTIVATIONS`

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
        y = Mlp(int(d * self.mlp_ratio), self.dtype, act=self.act, name="mlp")(
            nn.LayerNorm(name="norm2", **ln)(x))
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


# ----------------------------------------------------------------------------- windowed attention
# ViTDet / SAM image encoder pieces: non-overlapping windows with zero padding, and
# attention with decomposed relative positions (MViTv2, Li et al. 2022, eq. 4).


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, D) -> (B * nH * nW, window, window, D), zero-padding H and W up to
    multiples of `window` at the bottom / right. Returns the windows and (Hp, Wp)."""
    _, h, w, _ = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    windows = einops.rearrange(x, "b (y p) (x q) d -> (b y x) p q d", p=window, q=window)
    return windows, (h + ph, w + pw)


def window_unpartition(windows: jax.Array, window: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: (B * nH * nW, window, window, D) -> (B, H, W, D)."""
    hp, wp = pad_hw
    x = einops.rearrange(windows, "(b y x) p q d -> b (y p) (x q) d", y=hp // window, x=wp // window)
    return x[:, :hw[0], :hw[1]]


def resize_pos_embed_2d(pos: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bicubic resize of an absolute position table (1, Gh, Gw, D) -> (1, H, W, D).

    Same weights as ViTDet's `get_abs_pos` (`F.interpolate(..., mode="bicubic",
    align_corners=False)`), the common practice for running SAM / ViTDet encoders at
    another resolution. Identity when the sizes agree.
    """
    gh, gw = pos.shape[1:3]
    if (gh, gw) == tuple(hw):
        return pos
    my = jnp.asarray(cubic_matrix(gh, hw[0]))
    mx = jnp.asarray(cubic_matrix(gw, hw[1]))
    return jnp.einsum("yh,xw,bhwd->byxd", my, mx, pos.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(pos.dtype)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings for every (query, key) pair along one axis.

    rel_pos: (T, K) table; it is linearly resized to 2 * max(q, k) - 1 rows when its
    size differs (torch `F.interpolate(mode="linear")`, as SAM's `get_rel_pos`).
    Returns (q_size, k_size, K).
    """
    n = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n:
        m = jnp.asarray(linear_matrix(rel_pos.shape[0], n))
        rel_pos = jnp.einsum("oi,ik->ok", m, rel_pos.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST).astype(rel_pos.dtype)
    # Coordinates in float32 and truncated, as the reference computes them.
    q_coords = np.arange(q_size, dtype=np.float32)[:, None] * np.float32(max(k_size / q_size, 1.0))
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * np.float32(max(q_size / k_size, 1.0))
    rel = (q_coords - k_coords) + np.float32((k_size - 1) * max(q_size / k_size, 1.0))
    return rel_pos[rel.astype(np.int32)]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


def rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_pos_h: jax.Array,
                      rel_pos_w: jax.Array, hw: tuple[int, int],
                      chunk_bytes: int | None = None) -> jax.Array:
    """Self-attention over an (h, w) token grid with decomposed relative positions.

    q, k, v: (B, L, N, K) with L = h * w in raster order; rel_pos_h / rel_pos_w:
    (Th, K) / (Tw, K) tables. logits = q k^T / sqrt(K) + q . R_h[row(q), row(k)] +
    q . R_w[col(q), col(k)] (the position terms use the unscaled q, as the reference).
    Softmax in float32. Returns (B, L, N, K).

    chunk_bytes: the logits are computed in blocks that stay under this size
    (`lax.map` over the blocks when there are several): all heads at once if the whole
    float32 (B, N, L, L) fits, else groups of heads (B, m, L, L), else one head over
    blocks of whole image rows (B, 1, rows * w, L). None: 8 MiB when tracing for the
    CPU (cache-sized blocks), 1 GiB elsewhere (accelerators prefer few large kernels).
    """
    # NOTE: blocking and normalising after the value product (as flash attention does)
    # keep SAM's global-attention logits (12 x 4096 x 4096 floats per image at 1024)
    # out of main memory: O(L) instead of O(L^2) memory. Blocking by heads first (one
    # head's rows per block rather than all heads' rows) turns each logits / value
    # product into one plain (rows * w, K) x (K, L) matmul instead of N small batched
    # ones, faster on XLA:CPU than all-heads row blocks, which in turn beat one
    # (B, N, L, L) softmax (SAM ViT-B's global attention; benchmarks/README.md).
    # Same math per element; the rounding differs from a plain softmax at the 1e-7 level.
    # The backward pass recomputes each block's logits (`attend_block`'s custom VJP)
    # instead of keeping all blocks' probabilities, so training memory stays O(L) too.
    h, w = hw
    q, k, v = (einops.rearrange(t, "b l n k -> b n l k") for t in (q, k, v))
    b, n, length, kd = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).astype(q.dtype)  # (h, h, K)
    rw = get_rel_pos(w, w, rel_pos_w).astype(q.dtype)  # (w, w, K)
    if chunk_bytes is None:
        chunk_bytes = 8 * 2**20 if jax.default_backend() == "cpu" else 2**30
    head_bytes = b * length * length * 4  # float32 logits of one head
    heads = _largest_divisor(n, chunk_bytes // head_bytes)
    rows = h if heads > 1 else _largest_divisor(h, chunk_bytes // (b * w * length * 4))
    groups, blocks = n // heads, h // rows

    def group(qg, kg, vg):  # (C, B, m, r, w, K), (B, m, L, K) x 2 -> (C, B, m, r, w, K)
        rhc = rh.reshape(blocks, rows, h, kd)
        if blocks == 1:
            return attend_block(qg[0], rhc[0], rw, kg, vg)[None]
        return jax.lax.map(lambda a: attend_block(a[0], a[1], rw, kg, vg), (qg, rhc))

    qg = einops.rearrange(q, "b (g m) (c r w) k -> g c b m r w k", m=heads, r=rows, w=w)
    kg, vg = (einops.rearrange(t, "b (g m) s k -> g b m s k", m=heads) for t in (k, v))
    if groups == 1:
        out = group(qg[0], kg[0], vg[0])[None]
    else:
        out = jax.lax.map(lambda a: group(*a), (qg, kg, vg))  # (G, C, B, m, r, w, K)
    return einops.rearrange(out, "g c b m r w k -> b (c r w) (g m) k")


class RelPosAttention(nn.Module):
    """Multi-head self-attention on a token grid with decomposed relative positions.

    x: (B, H, W, D) -> (B, H, W, D). `input_size` S sets the tables `rel_pos_h/w`
    (2S - 1, K); another grid size resizes them linearly (see `get_rel_pos`).
    `window_size` > 0: attention within non-overlapping windows of that size, the grid
    zero-padded at the bottom / right as `window_partition` does (padded tokens take
    part as keys / values, as in the reference).
    """

    num_heads: int
    input_size: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    window_size: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
        head_dim = d // self.num_heads
        table = (2 * self.input_size - 1, head_dim)
        # the reference initialises the tables at zero (rel_pos_zero_init=True)
        rel_pos_h = self.param("rel_pos_h", _logical(nn.initializers.zeros, (None, None)), table)
        rel_pos_w = self.param("rel_pos_w", _logical(nn.initializers.zeros, (None, None)), table)
        qkv_layer = nn.Dense(
            3 * d, use_bias=self.qkv_bias, dtype=self.dtype,
            kernel_init=_logical(dense_init, ("embed", "heads")),
            bias_init=_logical(nn.initializers.zeros, ("heads",)), name="qkv")
        qkv = qkv_layer(x)  # (B, H, W, 3D)
        ws = self.window_size
        hp, wp = (h + (-h) % ws, w + (-w) % ws) if ws > 0 else (h, w)
        if ws > 0:
            # NOTE: the projections run on the unpadded grid; a zero-padded token's qkv is
            # the bias alone, added here exactly (0 + bias), and the output projection of
            # padded tokens (dropped anyway) is skipped: SAM at 1024 pads 64 -> 70, so this
            # saves 16% of the windowed blocks' qkv / proj matmuls. Same values as
            # projecting the padded windows.
            if (hp, wp) != (h, w):
                qkv = jnp.pad(qkv, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
                if self.qkv_bias:
                    pad_mask = np.ones((hp, wp, 1), np.float32)
                    pad_mask[:h, :w] = 0
                    bias = nn.meta.unbox(qkv_layer.variables["params"]["bias"])
                    qkv = qkv + jnp.asarray(pad_mask, qkv.dtype) * bias.astype(qkv.dtype)
            qkv, _ = window_partition(qkv, ws)  # (B * nW, ws, ws, 3D)
        gh, gw = qkv.shape[1:3]
        q, k, v = einops.rearrange(qkv, "b y x (t n k) -> t b (y x) n k", t=3, n=self.num_heads)
        out = rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, (gh, gw))  # (B', L, N, K)
        out = einops.rearrange(out, "b (y x) n k -> b y x (n k)", y=gh)
        if ws > 0:
            out = window_unpartition(out, ws, (hp, wp), (h, w))  # (B, H, W, D)
        return nn.Dense(
            d, dtype=self.dtype,
            kernel_init=_logical(dense_init, ("heads", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)), name="proj",
        )(out)  # (B, H, W, D)


class WindowedBlock(nn.Module):
    """Pre-norm ViTDet / SAM block on a token grid: windowed (window_size > 0) or
    global (window_size = 0) rel-pos attention, then an MLP (`mlp_names` layers).

    x: (B, H, W, D) -> (B, H, W, D). LayerNorms compute and return float32 whatever
    `dtype` is; the residual stream keeps the input's dtype (promoted by the adds).
    `input_size`: the token grid the global tables were trained for.
    `drop_path_rate`: stochastic depth of both residual branches when `train` (needs
    the 'dropout' rng).
    """

    num_heads: int
    input_size: int
    window_size: int = 0
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    mlp_names: tuple[str, str] = ("lin1", "lin2")
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, d = x.shape
        use_dp = train and self.drop_path_rate > 0.0
        ln = dict(epsilon=self.ln_eps, dtype=jnp.float32, use_fast_variance=False,
                  scale_init=_logical(nn.initializers.ones, ("embed",)),
                  bias_init=_logical(nn.initializers.zeros, ("embed",)))
        y = nn.LayerNorm(name="norm1", **ln)(x)
        ws = self.window_size
        y = RelPosAttention(self.num_heads, ws if ws > 0 else self.input_size, self.qkv_bias,
                            self.dtype, window_size=ws, name="attn")(y)
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        x = x + y
        y = nn.LayerNorm(name="norm2", **ln)(x).reshape(b, h * w, d)
        y = Mlp(int(d * self.mlp_ratio), self.dtype, self.mlp_names, name="mlp")(y).reshape(b, h, w, d)
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        return x + y


def windowed_vit_trunk(module: nn.Module, x: jax.Array, train: bool, *, patch_size: int, embed_dim: int,
                       depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, window_size: int,
                       global_attn_indexes: tuple[int, ...], pos_grid: int, rel_pos_grid: int, ln_eps: float,
                       mlp_names: tuple[str, str], dtype: Dtype, drop_path_rate: float = 0.0,
                       remat: bool = False, pos_init: Callable = nn.initializers.zeros) -> jax.Array:
    """The ViTDet / SAM image-encoder trunk, created inside `module` (call it from its
    compact method): `patch_embed`, `pos_embed` (1, G, G, D), `blocks_{i}`.

    images (B, S, S, 3) normalised -> (B, S/P, S/P, D) float32 (residual stream in float32,
    bf16 compute only inside the matmuls). pos_grid G: the pretraining token grid (the
    table is resized bicubically to the input grid); rel_pos_grid: the token grid the
    global blocks' rel-pos tables are sized for (2 * rel_pos_grid - 1 rows). Blocks in
    `global_attn_indexes` attend globally, the others within `window_size` windows; drop
    path rises linearly from 0 to `drop_path_rate` in the last block (active with `train`
    and a 'dropout' rng); `remat` recomputes each block in the backward pass.
    """
    b, s_h, s_w, _ = x.shape
    p, d = patch_size, embed_dim
    if s_h % p or s_w % p:
        raise ValueError(f"input {s_h}x{s_w} is not divisible by the patch size {p}")
    h, w = s_h // p, s_w // p
    # The references (segment_anything, detectron2's ViT) leave the patch projection at
    # torch's default init, whose bias is not zero. With a zero bias and the zero
    # position table of a fresh model, the tokens of the zero padding (SAM pads after
    # normalising) are exactly zero, and the first LayerNorm multiplies their gradient by
    # 1/sqrt(eps): training from scratch on padded images starts with exploding gradients.
    bias_init = functools.partial(torch_conv_bias_init, fan_in=p * p * x.shape[-1])
    x = PatchEmbed(p, d, dtype, bias_init=bias_init, name="patch_embed")(x)  # (B, H*W, D)
    # NOTE: residual stream in float32 (bf16 compute only inside the matmuls).
    x = x.reshape(b, h, w, d).astype(jnp.float32)
    pos = module.param("pos_embed", _logical(pos_init, (None, None, None, "embed")), (1, pos_grid, pos_grid, d))
    x = x + resize_pos_embed_2d(pos, (h, w))
    # `train` (argument 2 counting the module) is static under remat
    block = nn.remat(WindowedBlock, static_argnums=(2,)) if remat else WindowedBlock
    for i in range(depth):
        x = block(num_heads, input_size=rel_pos_grid,
                  window_size=0 if i in global_attn_indexes else window_size,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ln_eps=ln_eps, mlp_names=mlp_names,
                  dtype=dtype, drop_path_rate=drop_path_rate * i / max(depth - 1, 1),
                  name=f"blocks_{i}")(x, train)
    return x
