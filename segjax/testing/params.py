"""Seeded random parameters for a segjax model without running its (slow) init."""

from __future__ import annotations

import math

import jax
import numpy as np

from segjax.checkpoint import flatten_paths
from segjax.convert.common import unflatten
from segjax.models.vit import sincos_posemb_2d


def random_params(shapes, seed: int) -> dict:
    """numpy params shaped like `shapes` (an unboxed `eval_shape` params tree).

    LayerNorm scales around 1, biases and tokens small, kernels ~ N(0, 1/fan_in);
    `pos_embed` / `decoder_pos_embed` are the fixed sin-cos tables (official order).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_paths(shapes).items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("pos_embed", "decoder_pos_embed"):
            g = math.isqrt(s.shape[1] - 1)
            out[path] = sincos_posemb_2d(s.shape[-1], g, g, cls_token=True)[None]
            continue
        x = rng.standard_normal(s.shape).astype(np.float32)
        if leaf == "scale":
            x = 1.0 + 0.1 * x
        elif leaf == "bias":
            x = 0.1 * x
        elif leaf == "kernel":
            x = x / np.sqrt(np.prod(s.shape[:-1]))
        else:
            x = 0.5 * x
        out[path] = x
    return unflatten(out)


def abstract_params(model, *args, **kwargs):
    """The unboxed params tree of `jax.eval_shape(model.init)` (ShapeDtypeStructs)."""
    import flax.linen as nn

    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)))["params"]
