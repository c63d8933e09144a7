"""Inference functions lower for TPU and GPU (fp32 and bf16) from this CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from segjax import models


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mae_vit_tiny", "vit_tiny"])
def test_inference_lowers_for_tpu_and_cuda(name, dtype):
    m = models.build(name, dtype=dtype)
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        m.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, jnp.zeros(x.shape))))
    if name.startswith("mae"):
        fn = jax.jit(lambda p, im, noise: m.apply(p, im, noise))
        args = (params, x, jax.ShapeDtypeStruct((4, 64), jnp.float32))
    else:
        fn = jax.jit(lambda p, im: m.apply(p, im)["logits"])
        args = (params, x)
    exp = jax.export.export(fn, platforms=("tpu", "cuda"))(*args)
    assert exp.platforms == ("tpu", "cuda")
    assert ("bf16" in exp.mlir_module()) == (dtype == jnp.bfloat16)
