"""Segmenter glue without a model: detector proposals, candidate references, sessions."""

from __future__ import annotations

import numpy as np
import pytest

from segjax.annotate.images import ImageFolder
from segjax.annotate.segmenter import Segmenter, UnknownReference
from segjax.annotate.store import AnnotationStore


class FakeDetector:
    """torchvision's eval dict for two boxes of the generated a.png (96 x 128)."""

    def __call__(self, image):
        h, w = image.shape[:2]
        masks = np.zeros((3, 1, h, w), np.float32)
        masks[0, 0, 20:60, 30:70] = 0.9
        masks[1, 0, 5:10, 5:10] = 0.7
        masks[2, 0] = 0.2  # nothing above 0.5: dropped
        return {"boxes": np.array([[30, 20, 70, 60], [5, 5, 10, 10], [0, 0, w, h]], np.float32),
                "labels": np.array([1, 2, 1]), "scores": np.array([0.95, 0.6, 0.3], np.float32), "masks": masks}


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    return ImageFolder(tmp_path / "images")


def test_detector_proposals_accept_and_references(folder, tmp_path):
    store = AnnotationStore(tmp_path / "ann.json", ["thing"])
    seg = Segmenter(folder, None, store, str(tmp_path / "logits"), detector=FakeDetector())
    pred = seg.propose("s", "a.png")
    assert len(pred) == 2 and pred.scores == pytest.approx([0.95, 0.6]) and pred.size == (96, 128)
    want = np.zeros((96, 128), bool)
    want[20:60, 30:70] = True
    mask, prompt, score, low = seg.chosen("s", "a.png", pred.id, 0)
    np.testing.assert_array_equal(mask, want)
    assert prompt["box"] == [30, 20, 70, 60] and low is None and score == pytest.approx(0.95)
    with pytest.raises(UnknownReference, match="2 candidates"):
        seg.chosen("s", "a.png", pred.id, 2)
    with pytest.raises(UnknownReference, match="another image"):
        seg.chosen("s", "b.png", pred.id, 0)
    with pytest.raises(UnknownReference, match="unknown or expired"):
        seg.chosen("other-session", "a.png", pred.id, 0)
    assert seg.mask_prompt("s", "a.png", {"pred_id": pred.id, "index": 1}) is None  # a detector has no logits
    ann = store.add("a.png", mask.shape, mask, "thing", prompt, score, pred.source)
    seg.save_logits(ann["id"], np.ones((64, 64), np.float32))
    np.testing.assert_array_equal(seg.mask_prompt("s", "a.png", {"annotation": ann["id"]}), np.ones((64, 64)))
    with pytest.raises(UnknownReference, match="another image"):
        seg.mask_prompt("s", "b.png", {"annotation": ann["id"]})


def test_embedding_cache_round_trip(tmp_path):
    import jax.numpy as jnp

    from segjax.annotate.embedding_cache import EmbeddingCache, image_key
    from segjax.inference.sam.predictor import SamImage

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    key = image_key(image, "ckpt-a")
    assert key != image_key(image, "ckpt-b") and key != image_key(image.reshape(3, 2, 3), "ckpt-a")
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 8)), jnp.bfloat16)
    EmbeddingCache(tmp_path).put(key, SamImage(feats, (2, 3), (16, 24)))
    got = EmbeddingCache(tmp_path).get(key)  # a new cache object: read from disk
    assert got.features.dtype == jnp.bfloat16 and (got.original_size, got.input_size) == ((2, 3), (16, 24))
    np.testing.assert_array_equal(np.asarray(got.features, np.float32), np.asarray(feats, np.float32))
    path = tmp_path / key[:2] / (key + ".npz")
    path.write_bytes(b"damaged")
    assert EmbeddingCache(tmp_path).get(key) is None  # embedded again, not an error
