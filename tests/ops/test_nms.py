"""Static-shape NMS against torchvision.ops.nms / batched_nms: identical kept sets and order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from segjax.ops import batched_nms, nms
from segjax.ops.boxes import box_iou

torch.set_num_threads(1)


def clustered_boxes(rng, n, n_clusters=12, size=200.0):
    """Boxes jittered around a few centres, so that many overlap near any threshold."""
    c = rng.uniform(0, size, (n_clusters, 2))[rng.integers(0, n_clusters, n)]
    xy = c + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def kept(idx, valid):
    return np.asarray(idx)[np.asarray(valid)].tolist()


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("n,tile", [(300, 128), (300, 7), (1000, 128)])
def test_nms_matches_torchvision(n, tile, thr):
    rng = np.random.default_rng(n + int(thr * 10))
    boxes = clustered_boxes(rng, n)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    scores[rng.integers(0, n, n // 4)] = 0.5  # many exact ties: the stable order decides
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist()
    idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), thr, n, tile=tile)
    assert kept(idx, valid) == ref
    assert 5 < len(ref) < n  # it did suppress, and kept several
    # truncated output: the first K of torchvision's list
    k = len(ref) // 2
    idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), thr, k, tile=tile)
    assert kept(idx, valid) == ref[:k] and bool(np.all(valid))


def test_threshold_compared_as_double():
    """IoU exactly float32(0.3) (> 0.3 as a double) suppresses, as in the C++ kernel."""
    thr = 0.3
    b = np.array([[0, 0, 10, 10], [0, 0, 3, 10]], np.float32)  # IoU = 30 / 100 in float32
    iou = np.asarray(box_iou(jnp.asarray(b[:1]), jnp.asarray(b[1:])))[0, 0]
    assert iou == np.float32(thr) and float(np.float32(thr)) > thr
    s = np.array([0.9, 0.8], np.float32)
    ref = torchvision.ops.nms(torch.from_numpy(b), torch.from_numpy(s), thr).tolist()
    idx, valid = nms(jnp.asarray(b), jnp.asarray(s), thr, 2)
    assert kept(idx, valid) == ref == [0]


def test_valid_mask_and_padding():
    rng = np.random.default_rng(5)
    boxes = clustered_boxes(rng, 200)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    valid = rng.uniform(size=200) < 0.6
    ref = torchvision.ops.nms(torch.from_numpy(boxes[valid]), torch.from_numpy(scores[valid]), 0.5)
    ref = np.flatnonzero(valid)[ref.numpy()].tolist()
    idx, kv = nms(jnp.asarray(boxes), jnp.asarray(scores), 0.5, 200, jnp.asarray(valid))
    assert kept(idx, kv) == ref
    assert not np.any(np.asarray(kv)[len(ref):])
    # nothing valid: nothing kept
    idx, kv = nms(jnp.asarray(boxes), jnp.asarray(scores), 0.5, 10, jnp.zeros(200, bool))
    assert not np.any(np.asarray(kv))


@pytest.mark.parametrize("method", ["offset", "class"])
def test_batched_nms_matches_torchvision(method):
    from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

    rng = np.random.default_rng(6)
    n = 600
    boxes = clustered_boxes(rng, n, n_clusters=8)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    idxs = rng.integers(0, 5, n)
    valid = rng.uniform(size=n) < 0.8
    ref_fn = _batched_nms_coordinate_trick if method == "offset" else _batched_nms_vanilla
    tb = torch.from_numpy(boxes[valid])
    ref = ref_fn(tb, torch.from_numpy(scores[valid]), torch.from_numpy(idxs[valid]), 0.5)
    ref = np.flatnonzero(valid)[ref.numpy()].tolist()
    idx, kv = batched_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(idxs), 0.5, n,
                          jnp.asarray(valid), method=method)
    assert kept(idx, kv) == ref
    # per-category NMS keeps more than class-agnostic NMS on the same boxes
    agn = nms(jnp.asarray(boxes), jnp.asarray(scores), 0.5, n, jnp.asarray(valid))[1]
    assert int(np.sum(kv)) > int(np.sum(agn))


def test_nms_vmaps_over_images():
    rng = np.random.default_rng(7)
    boxes = np.stack([clustered_boxes(rng, 100) for _ in range(3)])
    scores = rng.uniform(0, 1, (3, 100)).astype(np.float32)
    idx, kv = jax.vmap(lambda b, s: nms(b, s, 0.5, 50))(jnp.asarray(boxes), jnp.asarray(scores))
    for i in range(3):
        ref = torchvision.ops.nms(torch.from_numpy(boxes[i]), torch.from_numpy(scores[i]), 0.5).tolist()
        assert kept(idx[i], kv[i]) == ref[:50]


def test_nms_lowers_for_tpu_and_cuda():
    fn = jax.jit(lambda b, s, c, v: (nms(b, s, 0.7, 100, v), batched_nms(b, s, c, 0.5, 100, v)))
    args = (jax.ShapeDtypeStruct((1000, 4), jnp.float32), jax.ShapeDtypeStruct((1000,), jnp.float32),
            jax.ShapeDtypeStruct((1000,), jnp.int32), jax.ShapeDtypeStruct((1000,), jnp.bool_))
    exp = jax.export.export(fn, platforms=("tpu", "cuda"))(*args)
    assert exp.platforms == ("tpu", "cuda")
