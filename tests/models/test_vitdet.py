"""ViTDet Mask R-CNN (`maskrcnn_vitdet_*`): converter both ways strict, parity of the
simple feature pyramid, RPN and RoI heads with a PyTorch twin (`tests/reference/
vitdet_torch.py`: segment_anything / timm / torchvision blocks), registry, training
contracts (drop path, sharded step == one device, exact resume), lowering for TPU / GPU.

Parity tolerance: rel err 1e-4 (fp32), as the other detection parity tests
(tests/models/test_maskrcnn.py).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("torchvision")
importorskip("timm")
importorskip("segment_anything")

from segjax import models  # noqa: E402
from segjax.checkpoint import flatten_paths  # noqa: E402
from segjax.convert import vitdet as conv  # noqa: E402
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN  # noqa: E402
from segjax.testing.train_steps import FAST_COMPILE, assert_steps_match, compiled_step  # noqa: E402

torch.set_num_threads(1)
REL_TOL = 1e-4
# the tiny variant with a pretraining grid smaller than the input's: pos_embed resized
KW = {"vit_pretrain_img_size": 64}


def _reference():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "reference", "vitdet_torch.py")
    spec = importlib.util.spec_from_file_location("vitdet_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(scope="module")
def twin():
    """(torch model, segjax model, converted params)."""
    model = models.build("maskrcnn_vitdet_tiny", **KW)
    tv = _reference().vitdet_torch(model, seed=0)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    params, meta, report = conv.from_state_dict(sd, variant="maskrcnn_vitdet_tiny")
    assert not report.unmapped and not report.missing
    return tv, models.build(meta["model"], **meta["model_kwargs"]), params, meta


def test_converter_reads_the_architecture_and_loads_back_strictly(twin):
    tv, model, params, meta = twin
    for k, v in KW.items():
        assert getattr(model, k) == v
    ref = models.build("maskrcnn_vitdet_tiny")
    for f in ("vit_embed_dim", "vit_depth", "vit_num_heads", "vit_window_size", "vit_global_attn_indexes",
              "vit_img_size", "fpn_channels", "box_convs", "mask_layers", "num_classes"):
        assert getattr(model, f) == getattr(ref, f), f
    sd = conv.to_state_dict(params, meta)
    tv.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in tv.state_dict().items():
        v = v.numpy()
        if k == conv.POS:  # the class-token row is not kept
            v = v[:, 1:]
            sd[k] = sd[k][:, 1:]
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    # a dropped or an extra tensor is an error, not a silent skip
    bad = {k: v.numpy() for k, v in tv.state_dict().items()}
    bad.pop("backbone.simfp_3.1.norm.weight")
    with pytest.raises(conv.ConversionError, match="simfp_3/conv1x1_norm/scale"):
        conv.from_state_dict(bad, variant="maskrcnn_vitdet_tiny")
    bad = {k: v.numpy() for k, v in tv.state_dict().items()}
    bad["backbone.simfp_3.9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(conv.ConversionError, match="simfp_3.9"):
        conv.from_state_dict(bad, variant="maskrcnn_vitdet_tiny")
    with pytest.raises(conv.ConversionError, match="not a ViTDet"):  # another family (ResNet-FPN)
        conv.from_state_dict({"backbone.body.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
    # heads are read from the rel-pos head dim (D / K): another count is refused, not loaded
    assert meta["model_kwargs"]["vit_num_heads"] == 4
    with pytest.raises(conv.ConversionError, match=r"vit_num_heads=2 \(the state dict: 4\)"):
        conv.from_state_dict(conv.to_state_dict(params, meta), variant="maskrcnn_vitdet_tiny",
                             model_kwargs={"vit_num_heads": 2})
    with pytest.raises(conv.ConversionError, match="not a registered maskrcnn_vitdet"):
        conv.from_state_dict(sd, variant="mask_rcnn_tiny")


def test_features_rpn_and_heads_match_torch(twin):
    tv, model, params, _ = twin
    rng = np.random.default_rng(0)
    s = model.vit_img_size
    x = rng.standard_normal((2, 3, s, s)).astype(np.float32)  # normalised images
    boxes = np.concatenate([rng.uniform(0, s / 2, (2, 12, 2)), rng.uniform(s / 2, s, (2, 12, 2))], -1)
    boxes[:, :3] = [[4, 4, 20, 30], [0, 0, s, s], [50, 60, 52, 61]]  # small, whole image, tiny
    boxes = boxes.astype(np.float32)
    with torch.no_grad():
        feats = tv.backbone(torch.from_numpy(x))
        obj, dl = tv.rpn.head(list(feats.values()))
        sizes = [(s, s)] * 2
        tb = [torch.from_numpy(b) for b in boxes]
        rh = tv.roi_heads
        cls_ref, reg_ref = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, tb, sizes)))
        mask_ref = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, tb, sizes)))

    def run(m, x, boxes):
        f = m.features_normalized(x)
        rpn = m.rpn_outputs(f, (s, s))
        return f, rpn["objectness"], rpn["deltas"], m.box_head(f, boxes, (s, s)), m.mask_head(f, boxes, (s, s))
    f, o, d, (cls, reg), mask = jax.jit(lambda p, x, b: model.apply({"params": p}, x, b, method=run))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(boxes))
    errs = {}
    for i, (ours, ref) in enumerate(zip(f, feats.values())):
        assert ours.shape == ref.permute(0, 2, 3, 1).shape
        errs[f"P{i + 2}"] = rel_err(ours, ref.permute(0, 2, 3, 1).numpy())
    # torchvision permute_and_flatten: (B, A, H, W) -> (B, H*W*A); deltas (B, H*W*A, 4)
    errs["objectness"] = rel_err(o, np.concatenate([t.permute(0, 2, 3, 1).reshape(2, -1).numpy() for t in obj], 1))
    ref_d = [t.view(2, -1, 4, *t.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4).numpy() for t in dl]
    errs["rpn_deltas"] = rel_err(d, np.concatenate(ref_d, 1))
    errs["class_logits"] = rel_err(cls.reshape(-1, cls.shape[-1]), cls_ref.numpy())
    errs["box_deltas"] = rel_err(reg.reshape(-1, reg.shape[-1]), reg_ref.numpy())
    errs["mask_logits"] = rel_err(mask.reshape(-1, *mask.shape[2:]), mask_ref.permute(0, 2, 3, 1).numpy())
    print({k: f"{v:.1e}" for k, v in errs.items()})
    assert np.abs(np.asarray(o)).max() > 0.1 and np.asarray(cls).std() > 0.1  # not degenerate
    for k, v in errs.items():
        assert v <= REL_TOL, k


def _photo_targets():
    """Two photo crops inside the 128 px frame (scale 1 in torchvision's transform, padded
    to 128 x 128) with ellipse instances: (images (3, H, W) in [0, 1], targets)."""
    from segjax.testing.maskrcnn_ref import chelsea, to_tensor

    img = chelsea()
    crops = [img[:128, 100:212], img[150:246, 200:328]]  # (128, 112), (96, 128)
    boxes = [np.array([[10, 12, 70, 90], [50, 40, 110, 120], [0, 0, 30, 28]], np.float32),
             np.array([[20, 10, 120, 80], [4, 30, 60, 94]], np.float32)]
    targets = []
    for crop, b in zip(crops, boxes):
        h, w = crop.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        masks = np.zeros((len(b), h, w), np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b):
            masks[i] = (((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2
                        + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2) <= 1
        targets.append({"boxes": torch.from_numpy(b), "labels": torch.tensor([1, 3, 4][:len(b)]),
                        "masks": torch.from_numpy(masks)})
    return [to_tensor(c) for c in crops], targets


def _off_relu_kinks(tv, images, targets, rel: float = 1e-5) -> None:
    """Moves the twin's box-head fc units off ReLU's kink on these inputs.

    An fc pre-activation within float32 rounding of zero (seed 1 has one at 1e-8 of the
    layer's largest) takes either side of the ReLU depending on summation order, and its
    RoI's whole gradient through that unit with it: both sides are right, so the parity
    test must not sit there. Each unit whose smallest |pre-activation| over the RoIs is
    below `rel` x the layer's largest gets its bias raised by 1e-3 x that largest (until
    none is left); the test then runs the nudged twin on both sides."""
    from segjax.testing import maskrcnn_ref as mref

    fcs = [m for m in tv.roi_heads.box_head.modules() if isinstance(m, torch.nn.Linear)]
    assert fcs, "the box head holds no fc layer"
    seen = {}
    for _ in range(5):
        seen.clear()
        hooks = [m.register_forward_hook(lambda mod, a, out: seen.__setitem__(mod, out.detach().clone()))
                 for m in fcs]
        samplers = tv.rpn.fg_bg_sampler, tv.roi_heads.fg_bg_sampler  # train_forward replaces them
        try:
            with torch.no_grad():
                mref.train_forward(tv, images, targets)
        finally:
            for hk in hooks:
                hk.remove()
            tv.rpn.fg_bg_sampler, tv.roi_heads.fg_bg_sampler = samplers
        near = {m: (x.abs().amin(0) < rel * x.abs().max()).nonzero().flatten() for m, x in seen.items()}
        if all(len(ix) == 0 for ix in near.values()):
            return
        with torch.no_grad():
            for m, ix in near.items():
                m.bias[ix] += 1e-3 * seen[m].abs().max()
    raise AssertionError("box-head fc units stay at the ReLU kink")


def test_train_losses_and_gradients_match_torch(monkeypatch):
    """Train mode, two images: the five losses and the gradient of their sum w.r.t. every
    parameter equal the PyTorch twin's (autograd). As for the R50 model
    (tests/models/test_maskrcnn.py), both balanced samplers are the same deterministic
    one (the first candidates by index) and our RoI stage takes the twin's RPN
    proposals; drop path is off (its randomness is not shared). The twin's gradients go
    through the converter (a linear map) onto our parameter tree.
    Tolerance: rel err 1e-4 per loss; per parameter, max |diff| <= 1e-4 x the largest
    entry of that parameter's reference gradient."""
    from segjax.ops import matcher
    from segjax.testing import maskrcnn_ref as mref

    model = models.build("maskrcnn_vitdet_tiny", **KW, vit_drop_path_rate=0.0)
    tv = _reference().vitdet_torch(model, seed=1)
    images, targets = _photo_targets()
    _off_relu_kinks(tv, images, targets)
    params, meta, _ = conv.from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()},
                                           variant="maskrcnn_vitdet_tiny", model_kwargs={"vit_drop_path_rate": 0.0})
    # one mask-head bucket (one branch to compile; the buckets are exact: test_maskrcnn.py)
    model = models.build(meta["model"], **meta["model_kwargs"], mask_roi_buckets=(model.box_batch_size_per_image // 4,))
    losses, props, il, tt = mref.train_forward(tv, images, targets)
    sum(losses.values()).backward()
    ref = {k: float(v.detach()) for k, v in losses.items()}
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in tv.named_parameters()}
    ref_grads, _, _ = conv.from_state_dict(grads, variant="maskrcnn_vitdet_tiny")
    assert tuple(il.tensors.shape[-2:]) == (model.vit_img_size,) * 2 and il.image_sizes == [(128, 112), (96, 128)]

    batch = mref.batch_from_torch(il, tt, model, 4)
    proposals = mref.padded_proposals(props, model.rpn_post_nms_top_n_train)
    monkeypatch.setattr(matcher, "sample_balanced", mref.det_sampler_jax)
    (_, ours), g = jax.jit(jax.value_and_grad(
        lambda p, b, pr: mref.losses_given_proposals(model, p, b, pr, jax.random.key(0)), has_aux=True))(
        params, batch, proposals)
    assert float(ours["roi_num_pos"]) >= 2 and ref["loss_mask"] > 0.1  # positives in both images
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
        err = abs(float(ours[k]) - ref[k]) / max(abs(ref[k]), 1e-8)
        print(f"{k}: ours {float(ours[k]):.6f} torch {ref[k]:.6f} rel {err:.1e}")
        assert err <= REL_TOL, k
    want = flatten_paths(ref_grads)
    errs = {p: rel_err(v, want[p]) for p, v in flatten_paths(jax.device_get(g)).items()}
    assert set(errs) == set(want)
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
    print("worst gradient rel errs", {p: f"{e:.1e}" for p, e in worst})
    for p in ("backbone/net/patch_embed/proj/kernel", "backbone/net/pos_embed",
              "backbone/net/blocks_1/attn/rel_pos_h", "rpn/cls_logits/kernel", "roi_heads/mask_head/conv0/kernel"):
        assert np.abs(want[p]).max() > 0, p  # the losses reach the backbone, the RPN and the heads
    assert worst[0][1] <= REL_TOL, worst


def test_registry_variants():
    from segjax.models.maskrcnn.vitdet import ViTDetBackbone, ViTDetNet

    spec = {"b": (768, 12, 12, (2, 5, 8, 11), 0.1), "l": (1024, 24, 16, (5, 11, 17, 23), 0.4),
            "h": (1280, 32, 16, (7, 15, 23, 31), 0.5)}
    for name, (d, depth, heads, glob, dp) in spec.items():
        m = models.build(f"maskrcnn_vitdet_{name}")
        assert isinstance(m, MaskRCNN) and m.backbone_type == "vitdet"
        assert (m.vit_embed_dim, m.vit_depth, m.vit_num_heads, m.vit_global_attn_indexes,
                m.vit_drop_path_rate) == (d, depth, heads, glob, dp)
        assert (m.vit_window_size, m.vit_patch_size, m.vit_img_size, m.vit_pretrain_img_size) == (14, 16, 1024, 224)
        assert m.head_norm_type == "ln" and m.rpn_conv_depth == 2 and m.box_convs == (256,) * 4
    # ViT-B at 1024: parameter count of the backbone (detectron2's ViT-B + simple FPN)
    b = models.build("maskrcnn_vitdet_b")
    x = jnp.zeros((1, 1024, 1024, 3))
    shapes = jax.eval_shape(lambda: ViTDetBackbone(ViTDetNet(drop_path_rate=0.0)).init(jax.random.key(0), x))
    n = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    assert 85e6 < n < 115e6, n
    assert b.fpn_channels == 256
    with pytest.raises(ValueError, match="backbone_type"):
        models.build("maskrcnn_vitdet_tiny", backbone_type="vit").init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.full((1, 2), 64, jnp.int32))


# ----------------------------------------------------------------------------- training


SIZE, BATCH = 64, 8


def _config():
    from configs.maskrcnn import shapes as shapes_config

    c = shapes_config.get_config("runlocal")
    c.unlock()
    c.model.name = "maskrcnn_vitdet_tiny"
    c.model.kwargs = {"num_classes": 4, "min_size": SIZE, "max_size": SIZE}
    c.data.min_size, c.data.max_size, c.data.pad_size, c.data.max_instances = SIZE, SIZE, (SIZE, SIZE), 3
    c.batch_size = BATCH
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    c.optim.frozen = ()
    return c


def _batches(n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        masks = np.zeros((BATCH, 3, SIZE, SIZE), np.uint8)
        boxes = np.zeros((BATCH, 3, 4), np.float32)
        for i in range(BATCH):
            for j in range(2):
                x0, y0 = rng.integers(0, SIZE // 2, 2)
                w, h = rng.integers(8, SIZE // 2, 2)
                masks[i, j, y0:y0 + h, x0:x0 + w] = 1
                boxes[i, j] = [x0, y0, x0 + w, y0 + h]
        out.append({"image": rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(np.float32),
                    "image_hw": np.full((BATCH, 2), SIZE, np.int32), "boxes": boxes,
                    "labels": np.tile(np.array([[1, 3, 0]], np.int32), (BATCH, 1)), "masks": masks,
                    "valid": np.tile(np.array([[True, True, False]]), (BATCH, 1))})
    return out


# The default run compiles the train steps at XLA backend optimisation level 0 (the same
# program, compiled in a fraction of the time); the slow variants as train.py does.
OPT_LEVELS = [pytest.param(FAST_COMPILE, id="O0"), pytest.param(None, id="default", marks=pytest.mark.slow)]


def _steps(tr, step, state, batches):
    losses = []
    for b in batches:
        with tr.mesh:
            state, m = step(state, tr.put_batch(b))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def fsdp_trainer():
    from segjax import sharding, train_loop

    return train_loop.Trainer(_config(), mesh=sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1}))


@pytest.fixture(scope="module")
def fsdp_steps(fsdp_trainer):
    """options -> the 8-device step compiled with them (once per module)."""
    cache = {}

    def get(options):
        if repr(options) not in cache:
            cache[repr(options)] = compiled_step(fsdp_trainer, fsdp_trainer.init_state(), _batches(1)[0], options)
        return cache[repr(options)]
    return get


@pytest.mark.parametrize("options", OPT_LEVELS)
def test_sharded_step_equals_single_device(fsdp_trainer, fsdp_steps, options):
    """Data 2 x FSDP 4 vs one device, two steps, each from the same state on both sides:
    losses, Adam's moments (the gradients) and parameters (segjax.testing.train_steps)."""
    from segjax import sharding, train_loop

    tr = fsdp_trainer
    spec = tr.param_shardings["backbone"]["net"]["blocks_0"]["mlp"]["fc1"]["kernel"].spec
    assert spec[0] == "fsdp", spec  # the ViT's parameters really are sharded
    one = train_loop.Trainer(_config(), mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1},
                                                                  devices=jax.devices()[:1]))
    # same math, another reduction order (fp32); discrete choices (top-k, NMS, sampling,
    # drop path) see the same rng and near-equal scores
    init, ref = assert_steps_match(
        tr, one, _batches(2), ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                               "loss_mask", "roi_num_pos", "grad_norm"), lr=1e-3, options=options,
        step=fsdp_steps(options), moment_rtol=2e-2)
    moved = np.abs(ref["backbone"]["net"]["blocks_0"]["attn"]["qkv"]["kernel"]
                   - init["backbone"]["net"]["blocks_0"]["attn"]["qkv"]["kernel"]).max()
    assert moved > 1.5e-3  # two Adam steps moved the ViT (not two untouched inits)


@pytest.mark.parametrize("options", OPT_LEVELS)
def test_resume_is_exact(fsdp_trainer, fsdp_steps, options, tmp_path):
    """Step 2 from a checkpoint of step 1 (sharded restore) == step 2 of an unbroken run,
    bit for bit, drop path and sampling included."""
    from segjax import checkpoint, train_loop

    tr, step = fsdp_trainer, fsdp_steps(options)
    b1, b2 = _batches(2)
    s1, _ = _steps(tr, step, tr.init_state(), [b1])
    ckpt = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep=1, async_save=False)
    ckpt.save(1, s1["params"], s1["opt_state"], {}, train_loop._meta(tr.config))
    s2, l2 = _steps(tr, step, s1, [b2])
    resumed, data = train_loop.restore_or_init(tr, ckpt)
    assert data["resumed_step"] == 1
    r2, lr2 = _steps(tr, step, resumed, [b2])
    assert l2 == lr2
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(s2)), jax.tree_util.tree_leaves(jax.device_get(r2))):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_drop_path_is_active_in_training_only():
    from segjax.models.maskrcnn.vitdet import ViTDetNet

    net = ViTDetNet(img_size=SIZE, pretrain_img_size=SIZE, embed_dim=32, depth=3, num_heads=2, window_size=2,
                    global_attn_indexes=(1,), drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, SIZE, SIZE, 3)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    run = jax.jit(lambda k, train: net.apply({"params": params}, x, train, rngs={"dropout": k}), static_argnums=1)
    f_eval, f_a, f_b = run(jax.random.key(0), False), run(jax.random.key(0), True), run(jax.random.key(1), True)
    assert np.abs(np.asarray(f_a) - np.asarray(f_b)).max() > 1e-3  # samples differ by rng
    assert np.abs(np.asarray(f_a) - np.asarray(f_eval)).max() > 1e-3
    np.testing.assert_array_equal(f_a, run(jax.random.key(0), True))


def test_train_step_lowers_for_tpu_and_cuda(fsdp_trainer):
    tr = fsdp_trainer
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   tr.abstract_state(), tr.state_shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=tr.batch_sharding)
             for k, v in _batches(1)[0].items()}
    exp = jax.export.export(tr.train_step, platforms=("tpu", "cuda"))(state, batch)
    assert exp.platforms == ("tpu", "cuda") and exp.nr_devices == 8
