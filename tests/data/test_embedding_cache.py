"""segjax.data.embedding_cache: each image's embedding computed once, stored atomically,
read back by a later run, recomputed when the stored file is unreadable."""

import os

import flax.linen as nn
import jax
import numpy as np

from segjax import models
from segjax.data.embedding_cache import EmbeddingCache, fingerprint


def _tiny_encoder():
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64)
    image = np.zeros((2, 64, 64, 3), np.float32)
    hw = np.full((2, 2), 64, np.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), image, hw,
                                          np.zeros((2, 1, 2, 2), np.float32), np.ones((2, 1, 2), np.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.05).astype(np.float32), shapes["params"])
    return model, params["image_encoder"]


def test_computed_once_read_back_and_recomputed_when_corrupt(tmp_path):
    model, enc = _tiny_encoder()
    key = fingerprint(enc, {"data": "test"})
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, size=(3, 64, 64, 3)).astype(np.float32)
    hw = np.full((3, 2), 64, np.int32)

    cache = EmbeddingCache(model, enc, key, str(tmp_path))
    first = cache.lookup(np.array([0, 1]), images[:2], hw[:2])
    assert cache.num_computed == 2
    again = cache.lookup(np.array([1, 2]), images[1:], hw[1:])
    assert cache.num_computed == 3  # only image 2 was new
    np.testing.assert_array_equal(again[0], first[1])
    assert sorted(os.listdir(tmp_path / key)) == ["0.npy", "1.npy", "2.npy"]  # no temporaries left

    # a later run reads the files, a corrupt one is computed again (same values)
    (tmp_path / key / "1.npy").write_bytes(b"not an array")
    later = EmbeddingCache(model, enc, key, str(tmp_path))
    out = later.lookup(np.array([0, 1]), images[:2], hw[:2])
    assert later.num_computed == 1
    np.testing.assert_allclose(out, first, rtol=1e-6, atol=1e-6)

    # other encoder parameters never share the entries
    other = jax.tree.map(lambda x: x + 1.0, enc)
    assert fingerprint(other, {"data": "test"}) != key
