"""The mask decoder's LayerNorms (torch `nn.LayerNorm` / SAM's `LayerNorm2d` on NHWC:
last-axis, float32, two-pass variance) with a hand-written backward pass.

Legend: N any leading shape, C the normalised (last) axis.

Same parameters ("scale" (C,) ones, "bias" (C,) zeros) and forward as flax's
`nn.LayerNorm(dtype=float32, use_fast_variance=False)`:
  y = (x - mean) * (rsqrt(var + eps) * scale) + bias,  var = mean((x - mean)^2).
The backward is the textbook one, from the input and the per-row mean and 1 / std:
  xhat = (x - mean) rstd,  g = dy scale,
  dx = rstd (g - mean(g) - xhat mean(g xhat)),  dscale = sum dy xhat,  dbias = sum dy.
Why by hand: differentiating the forward, JAX keeps the row statistics broadcast to
the input's shape as residuals, and with the decoder recomputed in the backward pass
(`Sam(decoder_remat=True)`) XLA:CPU writes several such (P, L, C) tensors per norm and
round. Here only (N,) row statistics are kept beside the input. Same math; sums in
another order (figures in benchmarks/README.md).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """x (N..., C) float32, scale / bias (C,) -> (N..., C): normalised over the last
    axis (two-pass variance), then scaled and shifted."""
    mean, rstd = _stats(x, eps)
    return (x - mean) * (rstd * scale) + bias


def _layer_norm_fwd(x, scale, bias, eps):
    mean, rstd = _stats(x, eps)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, dy):
    x, mean, rstd, scale = res
    xhat = (x - mean) * rstd
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx, jnp.sum(dy * xhat, axis=lead), jnp.sum(dy, axis=lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """`layer_norm` with flax `nn.LayerNorm`'s parameters ("scale", "bias"); computes
    in float32. x (N..., C) -> (N..., C) float32."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)
