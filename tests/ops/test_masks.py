"""paste_masks_in_image against torchvision.models.detection.roi_heads, fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("torchvision")

from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from segjax.ops import paste_masks_in_image

torch.set_num_threads(1)


@pytest.mark.parametrize("padding", [1, 0, 3])
def test_paste_matches_torchvision(padding):
    rng = np.random.default_rng(padding)
    im_h, im_w, n, m = 50, 70, 24, 14
    masks = rng.uniform(0, 1, (n, m, m)).astype(np.float32)
    xy = rng.uniform(0, [65, 45], (n, 2))  # torchvision fails on boxes that start past the image
    wh = rng.uniform(0.3, 40, (n, 2))
    wh[:3] = [[0.2, 0.4], [1.0, 1.0], [3.0, 0.5]]  # smaller than a pixel, down- and upsampling
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[3] = [60.5, 40.2, 120.0, 90.0]  # beyond the bottom-right corner
    boxes[4] = [-30.0, -20.0, 200.0, 130.0]  # covers the image
    boxes = np.concatenate([np.maximum(boxes[:, :2], 0.0), boxes[:, 2:]], 1).astype(np.float32)
    ref = tv_paste(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (im_h, im_w), padding)
    ours = paste_masks_in_image(jnp.asarray(masks), jnp.asarray(boxes), (im_h, im_w), padding)
    assert ours.shape == (n, im_h, im_w)
    np.testing.assert_allclose(np.asarray(ours), ref[:, 0].numpy(), atol=1e-6)
    assert (ref[:, 0].numpy() > 0).sum(axis=(1, 2)).min() > 0  # every box pasted something


def test_paste_lowers_for_tpu_and_cuda():
    fn = jax.jit(lambda m, b: paste_masks_in_image(m, b, (64, 96)))
    args = (jax.ShapeDtypeStruct((10, 28, 28), jnp.float32), jax.ShapeDtypeStruct((10, 4), jnp.float32))
    exp = jax.export.export(fn, platforms=("tpu", "cuda"))(*args)
    assert exp.out_avals[0].shape == (10, 64, 96)


@pytest.mark.parametrize("threads", [1, 2])
def test_paste_at_coco_size_matches_torchvision(threads):
    """Boxes of 40 to 420 px (non-integer scales of the 30 x 30 padded mask) on a
    427 x 640 image: the jnp op and the COCO evaluator's host paste equal torchvision's
    to a few float32 steps (both take torch's taps from segjax.ops.resample; the
    evaluator's own float32 taps were off by 1e-6 here). torch switches bilinear kernels
    with the thread count."""
    from segjax.evaluators.coco import paste_masks

    rng = np.random.default_rng(0)
    im_h, im_w, n = 427, 640, 16
    masks = rng.random((n, 28, 28)).astype(np.float32)
    xy = rng.uniform(0, [600, 400], (n, 2))
    wh = rng.uniform(40, 420, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [im_w - 1, im_h - 1])], 1).astype(np.float32)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = tv_paste(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (im_h, im_w))[:, 0].numpy()
    finally:
        torch.set_num_threads(old_threads)
    ours = np.asarray(paste_masks_in_image(jnp.asarray(masks), jnp.asarray(boxes), (im_h, im_w)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-7)
    np.testing.assert_allclose(paste_masks(masks, boxes, im_h, im_w), ref, rtol=0, atol=3e-7)
