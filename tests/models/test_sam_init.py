"""A fresh SAM's learned token tables start as segment_anything's `nn.Embedding`
(N(0, 1)), not flax's `nn.Embed` default (N(0, 1/C)): the point-label, not-a-point,
no-mask, IoU and mask tokens are added to or compared with unit-scale random-Fourier
position encodings, so 1/sqrt(C) tables start the labels nearly indistinguishable."""

import flax.linen as nn
import jax
import numpy as np

from segjax import models

TABLES = ("prompt_encoder/point_embeddings_0", "prompt_encoder/point_embeddings_1",
          "prompt_encoder/point_embeddings_2", "prompt_encoder/point_embeddings_3",
          "prompt_encoder/not_a_point_embed", "prompt_encoder/no_mask_embed",
          "mask_decoder/iou_token", "mask_decoder/mask_tokens")


def test_fresh_sam_token_tables_are_unit_normal_as_torch():
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64)
    params = nn.meta.unbox(model.init(
        jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), np.array([[64, 64]], np.int32),
        np.zeros((1, 1, 1, 2), np.float32), np.ones((1, 1, 1), np.int32))["params"])
    values = []
    for path in TABLES:
        node = params
        for key in path.split("/"):
            node = node[key]
        values.append(np.asarray(node["embedding"]).ravel())
    v = np.concatenate(values)  # 11 rows of C = 32 (flax's default: std ~0.18)
    assert 0.85 < v.std() < 1.15 and abs(v.mean()) < 0.15, (v.std(), v.mean())
