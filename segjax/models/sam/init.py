"""PyTorch's default layer initialisation, for the SAM modules trained from scratch
(prompt encoder, two-way transformer, mask decoder).

`segment_anything` defines no init of its own for these modules: every `nn.Linear`,
`nn.Conv2d` and `nn.ConvTranspose2d` keeps torch's default (`reset_parameters`:
kaiming-uniform with a = sqrt(5) for the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
and the bias from the same U), `nn.Embedding` draws N(0, 1) and `nn.LayerNorm` /
`LayerNorm2d` start at ones / zeros. Flax's defaults differ: `lecun_normal` kernels have
3x that variance and biases start at zero; `nn.Embed` draws N(0, 1/C). A model trained
from scratch starts from the reference's distributions with these initializers
(converted checkpoints overwrite every parameter, so inference is unaffected).

fan_in, as torch computes it from the weight it builds:
  Linear (out, in)                 in                   flax kernel (in, out)
  Conv2d (out, in, k, k)           in * k * k           flax kernel (k, k, in, out)
  ConvTranspose2d (in, out, k, k)  out * k * k (dim 1)  flax kernel (k, k, in, out)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

# torch's nn.Embedding: N(0, 1)
EMBEDDING = nn.initializers.normal(1.0)

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance 1/(3 fan_in), fan_in over the kernel's
# input axis and its receptive field (flax's Dense (in, out) and Conv (k, k, in, out))
KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# ConvTranspose2d: torch reads fan_in from the weight's dim 1, the OUTPUT channels
CONV_TRANSPOSE_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1,
                                                         out_axis=-2)


def bias(fan_in: int) -> nn.initializers.Initializer:
    """torch's bias init of a layer whose weight has this fan_in: U(-b, b), b = 1/sqrt(fan_in)."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
