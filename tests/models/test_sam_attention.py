"""SAM decoder attention: `attention` is the paper's, and each of the equal forms
`Attention` dispatches to gives its values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.sam import transformer
from segjax.models.sam.transformer import Attention, AttentionWeights, attention


def _plain(p, q, k, v, mask, n):
    """Reference attention (the official module's math) in numpy, float64."""
    def proj(x, name):
        return x @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)

    qh, kh, vh = proj(q, "q_proj"), proj(k, "k_proj"), proj(v, "v_proj")
    def split(x):
        return x.reshape(*x.shape[:-1], n, -1).swapaxes(-2, -3)  # (..., N, T, K)
    qh, kh, vh = split(qh), split(kh), split(vh)
    logits = qh @ kh.swapaxes(-1, -2) / np.sqrt(qh.shape[-1])
    logits = np.where(mask[:, :, None, None, :], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ vh).swapaxes(-2, -3)
    return proj(out.reshape(*out.shape[:-2], -1), "out_proj")


def _params(mod, key, *args):
    params = mod.init(jax.random.key(0), *args)["params"]
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(key), x.shape), params)


def _f64(x, p):
    return np.broadcast_to(x, (x.shape[0], p, *x.shape[2:])).astype(np.float64)


def _check(out, ref, shape):
    assert out.shape == shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # fp32 vs fp64


@pytest.mark.parametrize("pq,pk,tq,tk,masked", [
    (3, 3, 5, 5, True),  # token self-attention
    (3, 1, 5, 100, False),  # layer 0's tokens -> image tokens shared by the prompts
    (1, 3, 100, 5, True),  # image -> token
])
@pytest.mark.parametrize("form", ["reference", "divide_late"])
def test_reference_and_divide_late_match_plain_attention(pq, pk, tq, tk, masked, form):
    """`attention` (the module's reference path) and `attention_divide_late` (the
    dispatcher's fallback) against numpy float64, prompt axes shared or not."""
    n, c, p = 2, 64, 3
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, pq, tq, c)).astype(np.float32)
    k = rng.standard_normal((1, pk, tk, c)).astype(np.float32)
    v = rng.standard_normal((1, pk, tk, c)).astype(np.float32)
    mask = np.ones((1, pk, tk), bool)
    if masked:
        mask[0, -1, 2:] = False
    params = _params(Attention(n, 2), 8, q, k, v)
    w = AttentionWeights(*(params[f"{x}_proj"][y] for x in ("q", "k", "v", "out") for y in ("kernel", "bias")))
    fn = attention if form == "reference" else transformer.attention_divide_late
    out = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), w, n, jnp.asarray(mask))
    ref = _plain(params, _f64(q, p), _f64(k, p), _f64(v, p), np.broadcast_to(mask, (1, p, tk)), n)
    _check(out, ref, (1, p, tq, c))
    module = Attention(n, 2, reference=form == "reference").apply({"params": params}, q, k, v, jnp.asarray(mask))
    _check(module, ref, (1, p, tq, c))


@pytest.mark.parametrize("shared,seed,masked,key", [
    (True, 0, (1, 3), 1),  # image tokens shared by the prompts (layer 0): projected once per image
    (False, 3, (2, 4), 4),  # image tokens per prompt (layer 1): the folded projections
])
def test_image_to_token_matches_plain_attention(shared, seed, masked, key):
    n, c, p, nl, t = 2, 64, 3, 100, 5  # N T = 10 < I = 32 and L > I: image -> token forms
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1 if shared else p, nl, c)).astype(np.float32)
    k = rng.standard_normal((1, p, t, c)).astype(np.float32)
    mask = np.ones((1, p, t), bool)
    mask[0, masked[0], masked[1]:] = False
    mod = Attention(n, 2)
    params = _params(mod, key, q, k, k, mask)
    out = mod.apply({"params": params}, q, k, k, jnp.asarray(mask))
    ref = _plain(params, _f64(q, p), k.astype(np.float64), k.astype(np.float64), mask, n)
    _check(out, ref, (1, p, nl, c))


def test_token_to_image_separate_positional_encoding():
    """k_pe passed apart (the final attention: the encoding's product shared by the
    prompts) equals attention over k + k_pe."""
    n, c, p, nl, t = 2, 64, 3, 100, 5
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, p, t, c)).astype(np.float32)
    k = rng.standard_normal((1, p, nl, c)).astype(np.float32)
    pe = rng.standard_normal((1, 1, nl, c)).astype(np.float32)
    mod = Attention(n, 2)
    params = _params(mod, 6, q, k, k)
    out = mod.apply({"params": params}, q, k, k, k_pe=pe)
    ref = _plain(params, q.astype(np.float64), (k + pe).astype(np.float64), k.astype(np.float64),
                 np.ones((1, p, nl), bool), n)
    _check(out, ref, (1, p, t, c))


@pytest.mark.parametrize("p,seed,key", [
    (3, 1, 2),  # N T = 10 < I = 32, L > I, per-prompt keys: the folded path
    (1, 2, 3),  # P = 1 on both sides: folded too
])
def test_token_to_image_fold_matches_plain_attention(p, seed, key):
    n, c, nl, t = 2, 64, 100, 5
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, p, t, c)).astype(np.float32)
    k = rng.standard_normal((1, p, nl, c)).astype(np.float32)  # image tokens, one set per prompt
    v = rng.standard_normal((1, p, nl, c)).astype(np.float32) if p > 1 else k
    mod = Attention(n, 2)
    params = _params(mod, key, q, k, v)
    out = mod.apply({"params": params}, q, k, v)
    ref = _plain(params, q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                 np.ones((1, p, nl), bool), n)
    _check(out, ref, (1, p, t, c))


def _tiny_decoder_sam():
    from segjax.models.sam.sam import Sam

    return Sam(img_size=128, pretrain_img_size=128, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
               encoder_global_attn_indexes=(0,), window_size=4, prompt_embed_dim=64, decoder_num_heads=2,
               decoder_mlp_dim=64, iou_head_hidden_dim=32)


def test_dispatch_in_the_decoder(monkeypatch):
    """The form each of the decoder's attentions takes (C = 64, 2 heads: N T < I < L)."""
    names = ("attention_divide_late", "image_to_token_shared_queries", "image_to_token_folded",
             "token_to_image_folded")
    calls = []

    def recorder(name):
        fn = getattr(transformer, name)

        def record(*args):
            calls.append(name)
            return fn(*args)
        return record

    for name in names:
        monkeypatch.setattr(transformer, name, recorder(name))
    m = _tiny_decoder_sam()
    emb = jnp.zeros((1, 8, 8, 64))
    coords, labels = jnp.zeros((1, 3, 2, 2)), jnp.ones((1, 3, 2), jnp.int32)
    jax.eval_shape(lambda: m.init(jax.random.key(0), emb, coords, labels, method="predict_masks"))
    assert calls == [
        "attention_divide_late", "attention_divide_late", "image_to_token_shared_queries",  # layer 0
        "attention_divide_late", "token_to_image_folded", "image_to_token_folded",  # layer 1
        "token_to_image_folded",  # final attention
    ]


def test_decoder_with_folded_attentions_batched_equals_single_prompts():
    """A decoder whose cross-attentions all take the folded forms (C = 64, 2 heads: N T =
    14 < I = 32 < L = 64): three prompts at once (one with a padded token) equal each
    prompt alone."""
    m = _tiny_decoder_sam()
    emb = jax.random.normal(jax.random.key(0), (1, 8, 8, 64))
    coords = jax.random.uniform(jax.random.key(1), (1, 3, 2, 2)) * 128
    labels = jnp.asarray([[[1, -1], [1, 0], [0, -10]]], jnp.int32)
    params = jax.jit(lambda: m.init(jax.random.key(0), emb, coords, labels, method="predict_masks"))()
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(5), x.shape), params)
    run = jax.jit(lambda c, lab: m.apply(params, emb, c, lab, method="predict_masks"))
    out = run(coords, labels)
    for i in range(3):
        one = run(coords[:, i:i + 1], labels[:, i:i + 1])
        ref = np.asarray(one["low_res_logits"][0, 0])
        np.testing.assert_allclose(out["low_res_logits"][0, i], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(out["iou_predictions"][0, i], one["iou_predictions"][0, 0], atol=1e-5)
