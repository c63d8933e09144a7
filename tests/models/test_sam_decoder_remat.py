"""`Sam(decoder_remat=True)`: the mask decoder's activations recomputed in the backward
pass change no parameter, and outputs and gradients only by float rounding (single
head without a mask prompt, 3-mask head with one). And the decoder's hand-written
backward-pass forms (its LayerNorms, the prompt-axis broadcast's halving sum, the
divide-late softmax) against float64 / the plain formulas, jitted."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models.sam import transformer
from segjax.models.sam.layer_norm import LayerNorm, layer_norm
from segjax.models.sam.prompt_broadcast import broadcast_prompts, sum_prompts
from segjax.models.sam.transformer import AttentionWeights, attention


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


# ----------------------------------------------------------------------------- the decoder's backward-pass forms
# jitted (XLA:CPU's YNNPACK fusion has miscompiled rewrites under jit that eager runs got right)


def _layer_norm64(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return xhat * scale + bias, xhat


@pytest.mark.parametrize("shape,eps", [((3, 7, 256), 1e-5), ((2, 16, 64), 1e-5), ((1, 4, 5, 2, 2, 64), 1e-6),
                                       ((1, 2, 33, 8), 1e-6), ((5, 3), 1e-5)])
def test_layer_norm_forward_and_backward_match_float64(shape, eps):
    """`layer_norm`'s hand-written VJP against float64 numpy: y = xhat scale + bias,
    dx = rstd (g - mean g - xhat mean(g xhat)), g = dy scale; dscale, dbias sums."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.5, shape[-1]).astype(np.float32)
    bias = rng.normal(0.0, 0.5, shape[-1]).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    y, vjp = jax.jit(lambda *a: jax.vjp(lambda x, s, b: layer_norm(x, s, b, eps), *a))(x, scale, bias)
    dx, ds, db = jax.jit(vjp)(dy)

    x64, s64, dy64 = x.astype(np.float64), scale.astype(np.float64), dy.astype(np.float64)
    y64, xhat = _layer_norm64(x64, s64, bias.astype(np.float64), eps)
    rstd = 1 / np.sqrt(((x64 - x64.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + eps)
    g = dy64 * s64
    dx64 = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    lead = tuple(range(len(shape) - 1))
    for got, ref in ((y, y64), (dx, dx64), (ds, (dy64 * xhat).sum(lead)), (db, dy64.sum(lead))):
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # and autodiff of the plain formula gives the same gradient (not only our formula)
    auto = jax.jit(jax.grad(lambda x: jnp.sum(nn.LayerNorm(epsilon=eps, use_fast_variance=False).apply(
        {"params": {"scale": scale, "bias": bias}}, x) * dy)))(x)
    np.testing.assert_allclose(dx, auto, rtol=0, atol=2e-5 * np.abs(dx64).max())


def test_layer_norm_module_has_flax_layer_norm_params():
    x = jnp.ones((2, 3, 8))
    mine = LayerNorm(1e-6).init(jax.random.key(0), x)
    ref = nn.LayerNorm(epsilon=1e-6).init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), mine) == jax.tree.map(lambda a: (a.shape, a.dtype), ref)
    np.testing.assert_array_equal(mine["params"]["scale"], 1.0)
    np.testing.assert_array_equal(mine["params"]["bias"], 0.0)


@pytest.mark.parametrize("p", [1, 2, 3, 5, 16])
def test_broadcast_prompts_value_and_halving_sum_gradient(p):
    rng = np.random.default_rng(p)
    x = rng.normal(size=(2, 1, 7, 3)).astype(np.float32)
    ct = rng.normal(size=(2, p, 7, 3)).astype(np.float32)
    out, vjp = jax.jit(lambda x: jax.vjp(lambda x: broadcast_prompts(x, p), x))(x)
    np.testing.assert_array_equal(out, np.broadcast_to(x, (2, p, 7, 3)))
    (g,) = jax.jit(vjp)(ct)
    assert g.shape == x.shape
    np.testing.assert_allclose(g, ct.astype(np.float64).sum(1, keepdims=True), rtol=0, atol=1e-5)
    np.testing.assert_allclose(jax.jit(sum_prompts)(ct), ct.astype(np.float64).sum(1, keepdims=True), rtol=0,
                               atol=1e-5)
    per_prompt = jnp.asarray(ct)
    assert broadcast_prompts(per_prompt, p) is per_prompt
    with pytest.raises(ValueError, match="prompt axis"):
        broadcast_prompts(jnp.zeros((2, 3, 4)), 5)


@pytest.mark.parametrize("form,pq,pk,tq,tk", [
    ("token_to_image_folded", 3, 3, 5, 70), ("token_to_image_folded", 3, 1, 6, 70),
    ("attention_divide_late", 3, 3, 5, 5), ("attention_divide_late", 3, 1, 4, 40)])
def test_divide_late_softmax_gradients_match_plain_attention(form, pq, pk, tq, tk):
    """The divide-late softmax (its max under stop_gradient) gives the gradients of the
    paper's attention, w.r.t. the inputs and every projection, jitted."""
    n, c = 2, 32
    rng = np.random.default_rng(tq + tk)
    q = jnp.asarray(rng.normal(size=(1, pq, tq, c)).astype(np.float32))
    k = jnp.asarray(3 * rng.normal(size=(1, pk, tk, c)).astype(np.float32))  # large logits
    v = jnp.asarray(rng.normal(size=(1, pk, tk, c)).astype(np.float32))
    w = AttentionWeights(*(jnp.asarray(0.3 * rng.normal(size=s).astype(np.float32)) for s in (
        (c, c // 2), (c // 2,), (c, c // 2), (c // 2,), (c, c // 2), (c // 2,), (c // 2, c), (c,))))
    ct = jnp.asarray(rng.normal(size=(1, max(pq, pk), tq, c)).astype(np.float32))
    fn = getattr(transformer, form)

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(f(q, k, v, w, n) * ct), argnums=(0, 1, 2, 3)))(q, k, v, w)

    got, ref = jax.tree_util.tree_leaves(grads(fn)), jax.tree_util.tree_leaves(grads(attention))
    top = max(float(jnp.abs(b).max()) for b in ref)
    for a, b in zip(got, ref):  # the key bias's gradient is 0 in exact arithmetic: rounding noise, at 1e-2 top
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(float(jnp.abs(b).max()), 1e-2 * top))
