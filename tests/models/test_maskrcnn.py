"""Mask R-CNN model: anchors and transform against torchvision, train-mode loss parity,
shapes/static contracts, gradients, and TPU/GPU lowering of inference and a train step.

Loss parity: torchvision's and our balanced samplers are both replaced by the same
deterministic one (the first candidates by index), and our RoI stage consumes
torchvision's RPN proposals, so both sides compute the five losses on identical samples.
Tolerance: rel err 1e-4 (fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
torchvision = importorskip("torchvision")

from segjax import models  # noqa: E402
from segjax.models.maskrcnn import anchors as anchor_lib  # noqa: E402
from segjax.models.maskrcnn.backbone import frozen_patterns  # noqa: E402
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN, mask_rcnn_loss  # noqa: E402
from segjax.models.maskrcnn.roi_heads import project_masks_on_boxes  # noqa: E402
from segjax.ops import matcher  # noqa: E402
from segjax.ops.resample import resize_image, resized_hw  # noqa: E402
from segjax.testing import maskrcnn_ref as mref  # noqa: E402
from segjax.testing.maskrcnn_ref import chelsea, tiny_torch, to_tensor  # noqa: E402

torch.set_num_threads(1)
REL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def test_anchors_match_torchvision():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = anchor_lib.DEFAULT_SIZES, anchor_lib.DEFAULT_RATIOS
    gen = AnchorGenerator(sizes, (ratios,) * 5)
    hw = (96, 160)
    feats = [torch.zeros(1, 1, hw[0] // s, -(-hw[1] // s)) for s in (4, 8, 16, 32, 64)]
    ref = gen(ImageList(torch.zeros(1, 3, *hw), [hw]), feats)[0].numpy()
    ours = anchor_lib.grid_anchors([f.shape[-2:] for f in feats], hw, sizes, ratios)
    np.testing.assert_array_equal(ours, ref)


def test_resize_matches_torch_interpolate():
    img = chelsea()
    rhw = resized_hw(*img.shape[:2], 800, 1333)
    ref = torch.nn.functional.interpolate(to_tensor(img)[None], scale_factor=min(800 / 300, 1333 / 451),
                                          mode="bilinear", recompute_scale_factor=True,
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    assert ref.shape[:2] == rhw
    ours = resize_image(img, rhw) / 255.0
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("hw, size, seed", [((40, 56), 28, 0), ((37, 53), 28, 1), ((61, 29), 13, 2),
                                            ((427, 640), 28, 3)])
def test_project_masks_matches_roi_align(hw, size, seed):
    """Mask targets vs torchvision's `project_masks_on_boxes` on odd and photo-sized
    masks and boxes of every kind: inside, the whole mask, touching or crossing its
    border, several times larger than it (many more samples per bin than the mask has
    rows), tiny, degenerate. Tolerance 1e-5 (targets in [0, 1]; observed <= 2e-6)."""
    from torchvision.models.detection.roi_heads import project_masks_on_boxes as ref_fn

    rng = np.random.default_rng(seed)
    h, w = hw
    masks = (rng.random((3, h, w)) > 0.5).astype(np.uint8)
    n = 40
    x1, y1 = rng.uniform(-0.2 * w, w, n), rng.uniform(-0.2 * h, h, n)
    bw, bh = rng.uniform(0.5, w, n), rng.uniform(0.5, h, n)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    boxes[:4] = [[0, 0, w, h], [0, 0, w / 2, h], [w / 3, h / 2, w, h], [0, 3, w, 4.5]]  # touching the border
    big = rng.uniform(2, 6, (6, 2)) * [w, h] / 2  # several times larger than the mask
    ctr = rng.uniform(0, 1, (6, 2)) * [w, h]
    boxes[4:10] = np.concatenate([ctr - big, ctr + big], 1)
    boxes[10:13, 2:] = boxes[10:13, :2] + rng.uniform(0.01, 0.9, (3, 2))  # tiny
    boxes[13:15, 2] = boxes[13:15, 0] - 1.5  # degenerate (x2 < x1)
    boxes = boxes.astype(np.float32)
    idx = rng.integers(0, 3, n)
    ref = ref_fn(torch.from_numpy(masks), torch.from_numpy(boxes), torch.from_numpy(idx), size).numpy()
    # chunk 16: the last chunk is padded
    ours = project_masks_on_boxes(jnp.asarray(masks[None]), jnp.asarray(boxes[None]), jnp.asarray(idx[None]), size,
                                  chunk=16)
    assert ours.shape == (1, n, size, size)
    err = np.abs(np.asarray(ours[0]) - ref).max()
    print(f"{hw} -> {size}: max |ours - torchvision| {err:.1e}")
    assert err < 1e-5


def _targets(img):
    """Three instances on the photo (original pixels), with box-shaped blob masks."""
    h, w = img.shape[:2]
    boxes = np.array([[60, 40, 250, 260], [200, 20, 430, 200], [10, 150, 120, 290]], np.float32)
    masks = np.zeros((3, h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return {"boxes": torch.from_numpy(boxes), "labels": torch.tensor([1, 3, 4]), "masks": torch.from_numpy(masks)}


def test_train_losses_match_torchvision(monkeypatch):
    from segjax.convert import maskrcnn as conv

    tv = tiny_torch(5)
    params, meta, _ = conv.from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()},
                                           variant="mask_rcnn_tiny", bn_eps=1e-5)
    model = models.build(meta["model"], **meta["model_kwargs"])
    img = chelsea()
    # torchvision train forward with the deterministic sampler; keep its proposals
    with torch.no_grad():
        losses, props, il, tt = mref.train_forward(tv, [to_tensor(img)], [_targets(img)])
    ref = {k: float(v) for k, v in losses.items()}
    print("torchvision losses", ref)

    # our batch: the same resized targets, padded frame; our RoI stage on its proposals
    batch = mref.batch_from_torch(il, tt, model, 4)
    monkeypatch.setattr(matcher, "sample_balanced", mref.det_sampler_jax)
    proposals = mref.padded_proposals(props, model.rpn_post_nms_top_n_train)
    _, ours = jax.jit(lambda p, b, pr: mref.losses_given_proposals(model, p, b, pr, jax.random.key(0)))(
        params, batch, proposals)
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
        err = abs(float(ours[k]) - ref[k]) / max(abs(ref[k]), 1e-8)
        print(f"{k}: ours {float(ours[k]):.6f} torchvision {ref[k]:.6f} rel {err:.1e}")
        assert err <= REL_TOL, k


@pytest.fixture(scope="module")
def tiny():
    model = models.build("mask_rcnn_tiny")
    image = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 128, 160, 3)), jnp.float32)
    hw = jnp.asarray([[128, 160], [100, 150]], jnp.int32)
    # rbg keys: the init program (one RNG per parameter) compiles ~2x faster than threefry
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), image, hw)["params"]
    # the training forward creates the same parameters (the mask head through its bucketed loss)
    rngs = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
    train = jax.eval_shape(lambda: model.init(rngs, _batch(image, hw), method=MaskRCNN.losses))["params"]
    assert jax.tree.map(jnp.shape, train) == jax.tree.map(jnp.shape, params)
    return model, params, image, hw


def _batch(image, hw):
    b, h, w, _ = image.shape
    masks = np.zeros((b, 3, h, w), np.uint8)
    masks[:, 0, 20:60, 30:90] = 1
    masks[:, 1, 70:100, 10:40] = 1
    return {"image": image, "image_hw": hw,
            "boxes": jnp.asarray([[[30, 20, 90, 60], [10, 70, 40, 100], [0, 0, 0, 0]]] * b, jnp.float32),
            "labels": jnp.asarray([[1, 2, 0]] * b, jnp.int32), "masks": jnp.asarray(masks),
            "valid": jnp.asarray([[True, True, False]] * b)}


def test_inference_shapes_and_static_contract(tiny):
    model, params, image, hw = tiny
    out = jax.jit(model.apply)({"params": params}, image, hw)
    d = model.box_detections_per_img
    assert out["boxes"].shape == (2, d, 4) and out["masks"].shape == (2, d, 28, 28)
    assert out["labels"].dtype == jnp.int32 and out["valid"].dtype == jnp.bool_
    v = np.asarray(out["valid"])
    boxes = np.asarray(out["boxes"])
    # detections stay inside each image's own (unpadded) size
    assert (boxes[1][v[1]][:, 2] <= 150 + 1e-4).all() and (boxes[1][v[1]][:, 3] <= 100 + 1e-4).all()
    assert (np.asarray(out["labels"])[v] >= 1).all()
    scores = np.asarray(out["scores"])
    for i in range(2):
        assert (np.diff(scores[i][v[i]]) <= 0).all()


def _loss_and_grads(model, params, batch):
    return jax.jit(jax.value_and_grad(lambda p, b, r: mask_rcnn_loss(model, p, b, r), has_aux=True))(
        params, batch, jax.random.key(1))


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    """((loss, metrics), grads) of the default tiny model's train loss on `_batch`."""
    model, params, image, hw = tiny
    return _loss_and_grads(model, params, _batch(image, hw))


def test_train_step_grads(tiny_grads):
    (loss, metrics), grads = tiny_grads
    assert np.isfinite(float(loss)) and float(metrics["loss_mask"]) > 0
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): g
            for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    bn = [k for k in flat if k.endswith("/mean")]
    assert bn and all(not np.asarray(flat[k]).any() for k in bn)  # frozen BN gets no gradient
    assert np.asarray(flat["roi_heads/mask_predictor/mask_fcn_logits/kernel"]).any()
    assert np.asarray(flat["backbone/body/conv1/kernel"]).any()  # tiny: trainable_layers=5


@pytest.mark.parametrize("trainable_layers", [0, 3, 4])
def test_frozen_prefix_loop_is_exact(trainable_layers):
    """With several images, the frozen stem and stages run one image at a time in a loop
    (so that XLA keeps the frozen stages' outputs, not their blocks' conv outputs): the
    stage outputs and the trained params' gradients equal those of each image alone."""
    from segjax.models.maskrcnn.backbone import ResNetBody

    body = ResNetBody(depths=(1, 2, 1, 1), stem_width=8, width_per_group=8, trainable_layers=trainable_layers)
    x = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
    params = body.init(jax.random.key(1), x[:1])["params"]
    loss = lambda p, x: sum(jnp.sum(jnp.sin(o)) for o in body.apply({"params": p}, x))  # noqa: E731
    prims = lambda x: {e.primitive.name for e in jax.make_jaxpr(loss)(params, x).eqns}  # noqa: E731
    assert "scan" in prims(x) and "scan" not in prims(x[:1])
    outs = body.apply({"params": params}, x)
    alone = [body.apply({"params": params}, x[i:i + 1]) for i in range(2)]
    for i, o in enumerate(outs):
        np.testing.assert_allclose(o, jnp.concatenate([a[i] for a in alone]), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss)(params, x)
    grads_ref = jax.tree_util.tree_map(jnp.add, jax.grad(loss)(params, x[:1]), jax.grad(loss)(params, x[1:]))
    _assert_grads_close(grads, grads_ref)
    frozen = [k for k in ("conv1", "layer1_0", "layer2_0", "layer3_0", "layer4_0")
              if not any(np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads[k]))]
    assert len(frozen) == 5 - trainable_layers


@pytest.mark.parametrize("trainable_layers", [3, 5])
def test_backbone_remat_recomputes_per_image(trainable_layers):
    """`remat` with several images: the trained stages run one image at a time, and the
    backward pass recomputes them one image at a time, in a loop that XLA cannot merge
    back into the forward pass (as it does with `jax.checkpoint` on CPU). Outputs equal
    the plain body's; gradients (params, and the image when the stem trains) equal up
    to float rounding; the compiled gradient holds every trained convolution twice."""
    from segjax.models.maskrcnn.backbone import ResNetBody

    body = ResNetBody(depths=(1, 2, 1, 1), stem_width=8, width_per_group=8, trainable_layers=trainable_layers)
    x = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
    params = body.init(jax.random.key(1), x[:1])["params"]
    loss = lambda p, x, b: sum(jnp.sum(jnp.sin(o)) for o in b.apply({"params": p}, x))  # noqa: E731
    remat = body.clone(remat=True)
    for o, o_ref in zip(remat.apply({"params": params}, x), body.apply({"params": params}, x)):
        np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    compiled = [grad.lower(params, x, b).compile() for b in (body, remat)]
    (gp_ref, gx_ref), (gp, gx) = (c(params, x) for c in compiled)
    _assert_grads_close(gp, gp_ref)
    assert rel_err(gx, gx_ref) <= 1e-5 and (trainable_layers < 5) == (not np.asarray(gx_ref).any())
    convs = [c.as_text().count(" convolution(") for c in compiled]
    trained_blocks = sum(body.depths[4 - min(trainable_layers, 4):])
    assert convs[1] - convs[0] >= 3 * trained_blocks, convs  # merged back: as many as the plain body's


def test_backbone_remat_keeps_loss_and_grads(tiny):
    model, params, image, hw = tiny
    batch = _batch(image, hw)
    outs = [jax.jit(jax.value_and_grad(lambda p, b, r, m=m: mask_rcnn_loss(m, p, b, r)[0]))(
        params, batch, jax.random.key(1)) for m in (model.clone(backbone_remat=False), model)]
    np.testing.assert_allclose(float(outs[1][0]), float(outs[0][0]), rtol=1e-6)
    for g, g_ref in zip(jax.tree_util.tree_leaves(outs[1][1]), jax.tree_util.tree_leaves(outs[0][1])):
        assert float(jnp.abs(g - g_ref).max()) <= 1e-5 * max(float(jnp.abs(g_ref).max()), 1e-12)


def _assert_grads_close(grads, grads_ref, rtol=1e-5):
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(grads_ref)):
        scale = max(float(jnp.abs(g_ref).max()), 1e-12)
        assert float(jnp.abs(g - g_ref).max()) <= rtol * scale, jax.tree_util.keystr(path)


def test_mask_head_buckets_are_exact(tiny, tiny_grads):
    """The train-time mask head runs on the smallest bucket holding the positives; the
    loss and every gradient equal those of running it on all slots at once."""
    model, params, image, hw = tiny
    sp = model.box_batch_size_per_image // 4
    (loss_all, met_all), grads_all = _loss_and_grads(model.clone(mask_roi_buckets=(sp,), mask_roi_chunk=None),
                                                     params, _batch(image, hw))
    assert 1 < float(met_all["roi_num_pos"]) < 8 and float(met_all["loss_mask"]) > 0
    (loss, _), grads = tiny_grads  # bucket 8 of (8, 16)
    np.testing.assert_allclose(float(loss), float(loss_all), rtol=1e-6)
    _assert_grads_close(grads, grads_all)


def _tiny_mask_loss_inputs(b, r, valid_fn):
    """A tiny mask head and random inputs for `bucketed_mask_loss` on 64 x 64 images:
    (params, feats, rois, labels, matched, valid, gt, head_fn, pool_fn). valid_fn(rng) ->
    (b, r) bool, drawn after the RoIs."""
    from segjax.models.maskrcnn.roi_heads import RoIHeads

    rng = np.random.default_rng(0)
    hw = (64, 64)
    feats = [jnp.asarray(rng.standard_normal((b, hw[0] // s, hw[1] // s, 8)), jnp.float32) for s in (4, 8, 16, 32)]
    xy = rng.uniform(0, 40, (b, r, 2))
    rois = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 24, (b, r, 2))], -1), jnp.float32)
    valid = jnp.asarray(valid_fn(rng))
    labels = jnp.asarray(rng.integers(1, 3, (b, r)), jnp.int32)
    matched = jnp.asarray(rng.integers(0, 2, (b, r)), jnp.int32)
    gt = jnp.asarray(rng.uniform(size=(b, 2, *hw)) > 0.5)
    head = RoIHeads(num_classes=3, representation_size=16, mask_layers=(8, 8), mask_dim_reduced=8)
    params = head.init(jax.random.key(0), feats, rois, hw)["params"]
    params = {n: params[n] for n in ("mask_head", "mask_predictor")}
    head_fn = lambda p, x: head.apply({"params": p}, x, method=RoIHeads.mask_from_pooled)  # noqa: E731
    pool_fn = lambda f, x: head.apply({}, f, x, hw, method=RoIHeads.mask_pooled)  # noqa: E731
    return params, feats, rois, labels, matched, valid, gt, head_fn, pool_fn


def test_bucketed_mask_loss_chunks_are_exact():
    """`bucketed_mask_loss` on a tiny mask head: the chosen bucket, run `chunk` slots per
    image at a time, gives the loss and the gradients (w.r.t. the head and every pyramid
    level) of the head on all slots in one piece."""
    from segjax.models.maskrcnn.roi_heads import bucketed_mask_loss

    r = 16
    params, feats, rois, labels, matched, valid, gt, head_fn, pool_fn = _tiny_mask_loss_inputs(
        2, r, lambda rng: np.arange(r)[None] < np.array([[3], [6]]))  # positives first, 6 at most

    def loss(p, f, buckets, chunk):
        return bucketed_mask_loss(head_fn, p, pool_fn, f, rois, labels, matched, valid, gt, buckets, chunk)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
    value_all, grads_all = grad(params, feats, (r,), None)
    assert float(value_all) > 0 and float(jnp.abs(grads_all[1][0]).max()) > 0
    for buckets, chunk in [((4, 8, 16), 2), ((16,), 1)]:  # bucket 8 in 4 chunks; 16 one-slot chunks
        value, grads = grad(params, feats, buckets, chunk)
        np.testing.assert_allclose(float(value), float(value_all), rtol=1e-6)
        _assert_grads_close(grads, grads_all)


def test_frozen_patterns():
    import re

    pats = frozen_patterns(3)
    hit = lambda p: any(re.search(x, p) for x in pats)  # noqa: E731
    assert hit("backbone/body/conv1/kernel") and hit("backbone/body/layer1_2/conv2/kernel")
    assert hit("backbone/body/layer3_0/bn2/scale") and hit("roi_heads/mask_head/conv0_bn/var")
    assert not hit("backbone/body/layer2_0/conv2/kernel") and not hit("roi_heads/box_head/fc6/kernel")
    assert not hit("backbone/fpn/inner_blocks_0/bias")


def test_export_lowers_for_tpu_and_gpu(tiny):
    model, params, image, hw = tiny
    infer = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))
    jax.export.export(infer, platforms=("tpu", "cuda"))(params, image, hw)
    batch = _batch(image, hw)

    def step(p, b, r):
        (loss, _), g = jax.value_and_grad(lambda q: mask_rcnn_loss(model, q, b, r), has_aux=True)(p)
        return loss, jax.tree_util.tree_map(lambda a, c: a - 1e-3 * c, p, g)
    jax.export.export(jax.jit(step), platforms=("tpu", "cuda"))(params, batch, jax.random.key(0))


def test_model_is_registered():
    for name in ("mask_rcnn_r50_fpn", "mask_rcnn_r50_fpn_v2", "mask_rcnn_tiny"):
        assert isinstance(models.build(name), MaskRCNN)
    assert models.build("mask_rcnn_r50_fpn_v2").head_norm


@pytest.mark.parametrize("hw", [(11, 14), (37, 40)])  # patch matmul / per-tap slices (>= 256 outputs)
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3), (2, 2, 0)])
def test_conv2d_custom_vjp_matches_xla(k, stride, pad, hw):
    from segjax.models.maskrcnn.backbone import _conv_fwd_impl, conv2d

    rng = np.random.default_rng(k + stride)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 5, 4)), jnp.float32)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, stride, pad))), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(_conv_fwd_impl(x, w, stride, pad))), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("n_nonzero", [5, 40])  # <= K: sparse backward; > K: dense fallback
def test_rpn_head_sparse_backward_matches_dense(n_nonzero):
    from segjax.models.maskrcnn.rpn import _head_dense, rpn_head_level

    rng = np.random.default_rng(n_nonzero)
    f = jnp.asarray(rng.standard_normal((2, 12, 10, 8)), jnp.float32)
    shapes = [(3, 3, 8, 8), (8,), (1, 1, 8, 3), (3,), (1, 1, 8, 12), (12,)]
    ws = [jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in shapes]
    # cotangents on a few positions per image only, like the RPN loss on its sampled anchors
    mask = np.zeros((2, 12 * 10), bool)
    for i in range(2):
        mask[i, rng.choice(120, n_nonzero, replace=False)] = True
    mask = jnp.asarray(mask.reshape(2, 12, 10, 1))
    g_cls = jnp.where(mask, jnp.asarray(rng.standard_normal((2, 12, 10, 3)), jnp.float32), 0.0)
    g_reg = jnp.where(mask, jnp.asarray(rng.standard_normal((2, 12, 10, 12)), jnp.float32), 0.0)

    def loss(fn):
        return lambda *a: sum(jnp.sum(o * g) for o, g in zip(fn(*a), (g_cls, g_reg)))
    ours = jax.jit(jax.grad(loss(lambda *a: rpn_head_level(*a, 16)), argnums=tuple(range(7))))(f, *ws)
    ref = jax.jit(jax.grad(loss(_head_dense), argnums=tuple(range(7))))(f, *ws)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5


@pytest.mark.parametrize("remat", [False, True])
def test_per_image_loops_stay_on_each_device(remat):
    """The ResNet's per-image loops (frozen prefix, recomputed trained stages) under a
    batch sharded over 8 devices (`sharding.batch_shards`, as train_loop declares it):
    each device loops over its own images (no all-gather of the batch, which made every
    device compute every image), and the outputs' gradients equal one device's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segjax import sharding
    from segjax.models.maskrcnn.backbone import ResNetBody

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    body = ResNetBody(depths=(1, 1, 1, 1), stem_width=8, width_per_group=8, remat=remat)
    x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    params = body.init(jax.random.key(1), x[:1])["params"]
    loss = lambda p, x: sum(jnp.sum(jnp.tanh(o * 1e-2)) for o in body.apply({"params": p}, x))  # noqa: E731

    def grad(n):
        def g(p, x):
            with sharding.batch_shards(n):
                return jax.grad(loss)(p, x)
        return g

    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
    compiled = {n: jax.jit(grad(n), in_shardings=shardings).lower(params, x).compile() for n in (1, 8)}
    assert compiled[1].as_text().count("all-gather(") > 0  # the loop over the sharded axis gathers
    assert compiled[8].as_text().count("all-gather(") == 0
    got = compiled[8](params, jax.device_put(x, shardings[1]))
    # one device, the same per-device grouping (8 images per loop step; the batched
    # float32 gradients of this ResNet differ from per-image sums by more than rounding)
    _assert_grads_close(got, jax.jit(grad(8))(params, x))


def _data_parallel(fn, args, sharded):
    """{n: fn compiled with `sharding.batch_shards(n)` declared while it is traced and
    args[i] batch-sharded over 8 devices where sharded[i] (replicated otherwise)}."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segjax import sharding

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = tuple(NamedSharding(mesh, P("data") if s else P()) for s in sharded)

    def traced(n):
        def f(*a):
            with sharding.batch_shards(n):
                return fn(*a)
        return f

    compiled = {n: jax.jit(traced(n), in_shardings=shardings).lower(*args).compile() for n in (1, 8)}
    return compiled, traced, [jax.device_put(a, s) for a, s in zip(args, shardings)]


def test_mask_target_loop_stays_on_each_device():
    """`project_masks_on_boxes` under a batch sharded over 8 devices: each loop step
    projects one chunk of every shard's own RoIs (chunks of the whole batch's RoIs made
    XLA gather their boxes and gt masks onto every device), bit for bit the targets
    of one device."""
    rng = np.random.default_rng(0)
    b, r, m, (h, w) = 8, 12, 3, (40, 56)
    masks = jnp.asarray(rng.random((b, m, h, w)) > 0.5, jnp.uint8)
    xy = rng.uniform(-10, 50, (b, r, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(0.5, 80, (b, r, 2))], -1), jnp.float32)
    matched = jnp.asarray(rng.integers(0, m, (b, r)), jnp.int32)
    fn = lambda *a: project_masks_on_boxes(*a, chunk=8)  # noqa: E731  12 RoIs a shard: 2 steps, padded
    compiled, _, args = _data_parallel(fn, (masks, boxes, matched), (True, True, True))
    assert compiled[1].as_text().count("all-gather(") > 0
    assert compiled[8].as_text().count("all-gather(") == 0
    np.testing.assert_array_equal(compiled[8](*args), jax.jit(fn)(masks, boxes, matched))


def test_mask_loss_chunk_loop_stays_on_each_device():
    """`bucketed_mask_loss`'s loop over chunks of slots (bucket 8 in chunks of 4) under a
    batch sharded over 8 devices adds no all-gather: every device runs its own images'
    slots (and projects their mask targets); loss and gradients equal one device's."""
    from segjax.models.maskrcnn.roi_heads import bucketed_mask_loss

    b, r = 8, 8
    params, feats, rois, labels, matched, valid, gt, head_fn, pool_fn = _tiny_mask_loss_inputs(
        b, r, lambda rng: np.arange(r)[None] < rng.integers(1, r + 1, (b, 1)))  # positives first

    def grad(p, f, *rest):
        return jax.value_and_grad(lambda p, f: bucketed_mask_loss(head_fn, p, pool_fn, f, *rest, (8,), 4),
                                  argnums=(0, 1))(p, f)

    compiled, traced, args = _data_parallel(grad, (params, feats, rois, labels, matched, valid, gt),
                                            (False,) + (True,) * 6)
    assert compiled[8].as_text().count("all-gather(") == 0
    value, grads = compiled[8](*args)
    value_ref, grads_ref = jax.jit(traced(8))(params, feats, rois, labels, matched, valid, gt)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-6)
    _assert_grads_close(grads, grads_ref)


def test_top_k_sorted_matches_lax_top_k():
    """The sort form of top-k: the same values (bit for bit) and indices as `lax.top_k`,
    with NaNs, signed zeros, infinities and ties (lower index first)."""
    from segjax.models.maskrcnn.rpn import top_k_sorted

    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 1e-45, -1e-45], np.float32)
    xs = [rng.choice(specials, (3, 40)), rng.integers(-2, 3, (2, 5, 33)).astype(np.float32),
          rng.standard_normal((4, 257)).astype(np.float32)]
    for x in xs:
        for k in (1, 7, x.shape[-1]):
            v, i = jax.jit(top_k_sorted, static_argnums=1)(x, k)
            v_ref, i_ref = jax.lax.top_k(x, k)
            np.testing.assert_array_equal(i, i_ref)
            np.testing.assert_array_equal(np.asarray(v).view(np.int32), np.asarray(v_ref).view(np.int32))


def test_rpn_top_k_stays_on_each_device():
    """`filter_proposals`' per-level top-k and the RPN head's sparse backward under a
    batch sharded over 8 devices: no all-gather (XLA's TopK gathers the batch onto every
    device; the sort form stays on each), proposals bit for bit one device's, head
    gradients equal one device's."""
    from segjax.models.maskrcnn.rpn import _head_dense, filter_proposals, rpn_head_level

    rng = np.random.default_rng(0)
    b, sizes = 8, (600, 150, 40)
    n = sum(sizes)
    obj = jnp.asarray(rng.standard_normal((b, n)).round(1), jnp.float32)  # rounded: ties
    xy = rng.uniform(0, 100, (b, n, 2))
    props = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, 40, (b, n, 2))], -1), jnp.float32)
    hw = jnp.asarray([[128, 160]] * b, jnp.int32)
    fn = lambda o, p, hw: filter_proposals(o, p, sizes, hw, 100, 50)  # noqa: E731
    compiled, _, args = _data_parallel(fn, (obj, props, hw), (True, True, True))
    assert compiled[1].as_text().count("all-gather(") > 0  # lax.top_k on the sharded batch
    assert compiled[8].as_text().count("all-gather(") == 0
    got, ref = compiled[8](*args), jax.jit(fn)(obj, props, hw)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])

    f = jnp.asarray(rng.standard_normal((b, 12, 10, 8)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
          for s in ((3, 3, 8, 8), (8,), (1, 1, 8, 3), (3,), (1, 1, 8, 12), (12,))]
    mask = np.zeros((b, 12, 10, 1), bool)
    for i in range(b):  # 16 nonzero positions per image: the sparse backward
        mask[i].reshape(-1)[rng.choice(120, 16, replace=False)] = True
    g_cls = jnp.where(mask, jnp.asarray(rng.standard_normal((b, 12, 10, 3)), jnp.float32), 0.0)
    g_reg = jnp.where(mask, jnp.asarray(rng.standard_normal((b, 12, 10, 12)), jnp.float32), 0.0)

    def grad(f, *ws):
        loss = lambda *a: sum(jnp.sum(o * g) for o, g in zip(rpn_head_level(*a, 16), (g_cls, g_reg)))  # noqa: E731
        return jax.grad(loss, argnums=tuple(range(7)))(f, *ws)

    compiled, _, args = _data_parallel(grad, (f, *ws), (True,) + (False,) * 6)
    assert "sort(" in compiled[8].as_text() and compiled[8].as_text().count("all-gather(") == 0
    dense = jax.jit(jax.grad(lambda *a: sum(jnp.sum(o * g) for o, g in zip(_head_dense(*a), (g_cls, g_reg))),
                             argnums=tuple(range(7))))(f, *ws)
    for a, r in zip(compiled[8](*args), dense):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_train_loss_gradient_holds_no_all_gather(tiny):
    """The tiny model's whole train-loss gradient under a batch of 8 sharded over 8
    devices (`sharding.batch_shards(8)`, as train_loop declares it) holds no all-gather:
    every per-image loop, RoI chunk loop and top-k stays on each device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segjax import sharding

    model, params, image, hw = tiny
    batch = _batch(jnp.concatenate([image] * 4), jnp.concatenate([hw] * 4))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def grad(p, b, r):
        with sharding.batch_shards(8):
            return jax.value_and_grad(lambda p: mask_rcnn_loss(model, p, b, r), has_aux=True)(p)

    compiled = jax.jit(grad, in_shardings=(rep, jax.tree.map(lambda _: dat, batch), rep)).lower(
        params, batch, jax.random.key(1)).compile()
    assert compiled.as_text().count("all-gather(") == 0
