"""`Sam(decoder_remat=True)`: the mask decoder's activations recomputed in the backward
pass change no parameter, and outputs and gradients only by float rounding (single
head without a mask prompt, 3-mask head with one)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models


def test_decoder_remat_same_params_outputs_and_gradients():
    plain, remat = models.build("sam_vit_tiny"), models.build("sam_vit_tiny", decoder_remat=True)
    rng = np.random.default_rng(0)
    b, p, t, h = 1, 3, 4, plain.embedding_size
    emb = rng.normal(0, 1, (b, h, h, plain.prompt_embed_dim)).astype(np.float32)
    coords = rng.uniform(0, plain.img_size, (b, p, t, 2)).astype(np.float32)
    labels = rng.choice(np.array([0, 1, -1, 2, 3], np.int32), (b, p, t))
    masks = rng.normal(0, 3, (b, p, 4 * h, 4 * h, 1)).astype(np.float32)
    has = np.ones((b, p), bool)
    init = jax.jit(lambda m: m.init(jax.random.key(0), emb, coords, labels, masks, has, method=m.predict_masks),
                   static_argnums=0)
    variables = nn.meta.unbox(init(plain))
    leaves, tree = jax.tree_util.tree_flatten(variables)
    assert jax.tree_util.tree_structure(nn.meta.unbox(jax.eval_shape(init, remat))) == tree
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    def loss(model, mask_input, multimask):
        def f(v):
            out = model.apply(v, emb, coords, labels, mask_input, None, multimask, method=model.predict_masks)
            return jnp.sum(jnp.tanh(out["low_res_logits"])) + jnp.sum(out["iou_predictions"] ** 2)
        return jax.jit(jax.value_and_grad(f))

    # remat changes how XLA fuses, so sums round differently: 1e-5 of the loss, 1e-4 of each
    # gradient leaf's largest entry (at least 1e-6 of the largest gradient: leaves whose
    # gradient is zero in exact arithmetic, such as the key biases, hold rounding noise)
    for mask_input, multimask in ((None, False), (masks, True)):
        (v0, g0), (v1, g1) = loss(plain, mask_input, multimask)(variables), loss(remat, mask_input, multimask)(
            variables)
        np.testing.assert_allclose(v1, v0, rtol=1e-5)
        reached = 0
        top = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g0))
        for a, c in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
            scale = float(jnp.max(jnp.abs(a)))
            np.testing.assert_allclose(c, a, rtol=0, atol=1e-4 * max(scale, 1e-2 * top))
            reached += scale > 1e-3 * top
        assert reached > 20  # the loss reaches the decoder's (and the prompt encoder's) parameters
