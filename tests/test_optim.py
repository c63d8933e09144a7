"""optim: schedules, weight-decay masks, layer decay and freezing do what they say."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import optim


def _cfg(**kw):
    base = dict(name="adamw", lr=None, base_lr=0.256, b1=0.9, b2=0.95, weight_decay=0.1,
                warmup_steps=10, schedule="cosine", min_lr=0.0, layer_decay=None, frozen=(),
                no_decay=(), grad_clip_norm=None)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _params():
    return {"patch_embed": {"proj": {"kernel": jnp.ones((2, 2, 3, 4)), "bias": jnp.ones(4)}},
            "pos_embed": jnp.ones((1, 5, 4)),
            "blocks_0": {"attn": {"qkv": {"kernel": jnp.ones((4, 12))}}},
            "blocks_1": {"attn": {"qkv": {"kernel": jnp.ones((4, 12))}}},
            "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}


def test_lr_scaling_and_warmup_cosine():
    cfg = _cfg()
    assert optim.peak_lr(cfg, 512) == pytest.approx(0.512)
    s = optim.make_schedule(cfg, 256, 110)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(0.256)
    assert float(s(5)) == pytest.approx(0.128)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(_cfg(schedule="bogus"), 256, 10)


def test_layer_ids_and_decay_scales():
    assert optim.vit_layer_id("cls_token", 2) == 0
    assert optim.vit_layer_id("blocks_1/attn/qkv/kernel", 2) == 2
    assert optim.vit_layer_id("head/kernel", 2) == 3
    scales = optim.layer_decay_scales(_params(), 0.5, 2)
    assert scales["head"]["kernel"] == 1.0
    assert scales["blocks_1"]["attn"]["qkv"]["kernel"] == 0.5
    assert scales["blocks_0"]["attn"]["qkv"]["kernel"] == 0.25
    assert scales["pos_embed"] == 0.125


def test_frozen_and_weight_decay_masks_in_updates():
    p = _params()
    tx, _ = optim.make_optimizer(_cfg(lr=1.0, warmup_steps=0, schedule="constant",
                                      frozen=(r"^pos_embed$",), no_decay=(r"^head/",)), p, 256, 100)
    state = tx.init(p)
    zero = jax.tree_util.tree_map(jnp.zeros_like, p)
    upd, _ = tx.update(zero, state, p)
    # zero grads: only decoupled weight decay acts, and only on >1-d, non-exempt params
    assert float(jnp.abs(upd["pos_embed"]).max()) == 0.0            # frozen
    assert float(jnp.abs(upd["head"]["kernel"]).max()) == 0.0       # no_decay regex
    assert float(jnp.abs(upd["patch_embed"]["proj"]["bias"]).max()) == 0.0  # 1-d
    np.testing.assert_allclose(upd["blocks_0"]["attn"]["qkv"]["kernel"], -0.1)
    grads = jax.tree_util.tree_map(jnp.ones_like, p)
    upd, _ = tx.update(grads, state, p)
    assert float(jnp.abs(upd["pos_embed"]).max()) == 0.0


def test_layer_decay_scales_adam_update():
    p = _params()
    tx, _ = optim.make_optimizer(_cfg(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0,
                                      layer_decay=0.5), p, 256, 100, depth=2)
    upd, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, p), tx.init(p), p)
    h = float(upd["head"]["kernel"][0, 0])
    np.testing.assert_allclose(upd["blocks_0"]["attn"]["qkv"]["kernel"], h * 0.25, rtol=1e-6)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make_optimizer(_cfg(name="adamx"), _params(), 8, 10)
    with pytest.raises(ValueError, match="freezes every"):
        optim.make_optimizer(_cfg(frozen=(".*",)), _params(), 8, 10)


def test_step_schedule_warmup_then_two_decays():
    s = optim.make_schedule(_cfg(lr=1.0, schedule="step", warmup_steps=250, decay_steps=(1000, 1500),
                                 decay_factor=0.1), 256, 2000)
    assert float(s(0)) == 0.0 and float(s(125)) == pytest.approx(0.5)
    assert float(s(250)) == float(s(999)) == pytest.approx(1.0)
    assert float(s(1000)) == float(s(1499)) == pytest.approx(0.1)
    assert float(s(1500)) == float(s(1999)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule(_cfg(lr=1.0, schedule="step", warmup_steps=250, decay_steps=(100,)), 256, 10)


def test_layer_decay_scope_leaves_other_params_at_full_lr():
    p = {"image_encoder": {"patch_embed": {"kernel": jnp.ones((2, 2))},
                           "blocks_0": {"kernel": jnp.ones((2, 2))},
                           "neck_0": {"kernel": jnp.ones((2, 2))}},
         "mask_decoder": {"kernel": jnp.ones((2, 2))}}
    s = optim.layer_decay_scales(p, 0.5, 1, scope="image_encoder/")
    assert s["image_encoder"]["patch_embed"]["kernel"] == 0.25
    assert s["image_encoder"]["blocks_0"]["kernel"] == 0.5
    assert s["image_encoder"]["neck_0"]["kernel"] == 1.0
    assert s["mask_decoder"]["kernel"] == 1.0


def test_layer_decay_depth_counted_under_the_scope_for_vitdet():
    """Mask R-CNN's ViTDet has no `depth`: the blocks under layer_decay_scope give it;
    detectron2's get_vit_lr_decay_rate: pos/patch embed 0, blocks_i i + 1, the rest
    (pyramid, heads) depth + 1, i.e. lr x1."""
    z = jnp.zeros((2, 2))
    params = {"backbone": {"net": {"pos_embed": z, "patch_embed": {"proj": {"kernel": z}},
                                   **{f"blocks_{i}": {"attn": {"qkv": {"kernel": z}}} for i in range(3)}},
                           "simfp_2": {"conv1x1": {"kernel": z}}}, "rpn": {"conv": {"kernel": z}}}
    assert optim.vit_depth(params, "backbone/net/") == 3
    s = optim.layer_decay_scales(params, 0.5, 3, "backbone/net/")
    assert s["backbone"]["net"]["pos_embed"] == 0.5 ** 4
    assert s["backbone"]["net"]["blocks_0"]["attn"]["qkv"]["kernel"] == 0.5 ** 3
    assert s["backbone"]["net"]["blocks_2"]["attn"]["qkv"]["kernel"] == 0.5
    assert s["backbone"]["simfp_2"]["conv1x1"]["kernel"] == 1.0 and s["rpn"]["conv"]["kernel"] == 1.0
    cfg = ml_collections.ConfigDict({"name": "adamw", "lr": 1.0, "layer_decay": 0.5,
                                     "layer_decay_scope": "backbone/net/"})
    optim.make_optimizer(cfg, params, 8, 10)  # depth from the tree
    with pytest.raises(ValueError, match="no 'blocks_<i>/' parameters under scope 'backbone/vit/'"):
        optim.make_optimizer(ml_collections.ConfigDict(dict(cfg, layer_decay_scope="backbone/vit/")), params, 8, 10)
