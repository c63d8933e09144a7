"""SAM decoder Attention: the folded / shared-query / split-encoding forms equal plain attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.sam.transformer import Attention


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
    params = mod.init(jax.random.key(0), q, k, k, mask)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(key), x.shape), params)
    out = mod.apply({"params": params}, q, k, k, jnp.asarray(mask))
    ref = _plain(params, np.broadcast_to(q, (1, p, nl, c)).astype(np.float64), k.astype(np.float64),
                 k.astype(np.float64), mask, n)
    assert out.shape == (1, p, nl, c)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # fp32 vs fp64


def test_token_to_image_separate_positional_encoding():
    """k_pe passed apart (the final attention: the encoding's product shared by the
    prompts) equals attention over k + k_pe."""
    n, c, p, nl, t = 2, 64, 3, 100, 5
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, p, t, c)).astype(np.float32)
    k = rng.standard_normal((1, p, nl, c)).astype(np.float32)
    pe = rng.standard_normal((1, 1, nl, c)).astype(np.float32)
    mod = Attention(n, 2)
    params = mod.init(jax.random.key(0), q, k, k)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(6), x.shape), params)
    out = mod.apply({"params": params}, q, k, k, k_pe=pe)
    ref = _plain(params, q.astype(np.float64), (k + pe).astype(np.float64), k.astype(np.float64),
                 np.ones((1, p, nl), bool), n)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_token_to_image_fold_matches_plain_attention():
    n, c, p, nl, t = 2, 64, 3, 100, 5  # N T = 10 < I = 32, L > I, per-prompt keys: the folded path
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, p, t, c)).astype(np.float32)
    k = rng.standard_normal((1, p, nl, c)).astype(np.float32)  # image tokens, one set per prompt
    v = rng.standard_normal((1, p, nl, c)).astype(np.float32)
    mod = Attention(n, 2)
    params = mod.init(jax.random.key(0), q, k, v)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)
    out = mod.apply({"params": params}, q, k, v)
    ref = _plain(params, q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                 np.ones((1, p, nl), bool), n)
    assert out.shape == (1, p, t, c)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # fp32 vs fp64


def test_token_to_image_fold_single_prompt_matches_plain_attention():
    n, c, nl, t = 2, 64, 100, 5  # P = 1 on both sides: folded too
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 1, t, c)).astype(np.float32)
    k = rng.standard_normal((1, 1, nl, c)).astype(np.float32)
    mod = Attention(n, 2)
    params = mod.init(jax.random.key(0), q, k, k)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), params)
    out = mod.apply({"params": params}, q, k, k)
    ref = _plain(params, q.astype(np.float64), k.astype(np.float64), k.astype(np.float64),
                 np.ones((1, 1, nl), bool), n)
    assert out.shape == (1, 1, t, c)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_decoder_with_folded_attentions_batched_equals_single_prompts():
    """A decoder whose cross-attentions all take the folded forms (C = 64, 2 heads: N T =
    14 < I = 32 < L = 64): three prompts at once (one with a padded token) equal each
    prompt alone."""
    from segjax.models.sam.sam import Sam

    m = Sam(img_size=128, pretrain_img_size=128, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            encoder_global_attn_indexes=(0,), window_size=4, prompt_embed_dim=64, decoder_num_heads=2,
            decoder_mlp_dim=64, iou_head_hidden_dim=32)
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
