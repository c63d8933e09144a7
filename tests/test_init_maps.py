"""Declared init_from mappings (segjax.convert.init_maps): MAE -> ViTDet backbone, MAE ->
SAM image encoder, SAM image encoder -> ViTDet backbone.

Every source tensor is perturbed in turn and exactly the one target leaf it maps to
must change (nothing else); position tables equal timm's `resample_abs_pos_embed`
(run live) within float32 rounding; bad checkpoints fail naming the mismatch.
Parameter trees come from `jax.eval_shape` of the registry models (no compile).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import checkpoint, models
from segjax.convert import init_maps
from segjax.convert.init_maps import InitMapError
from segjax.testing import importorskip

POS_ATOL = 1e-5  # torch computes its antialiased weights in float32 (errors ~1e-6 each); values ~N(0, 1)

MAE_ALLOW_UNEXPECTED = (r"^decoder_", r"^mask_token$", r"^norm/", r"^cls_token$")
VITDET_ALLOW_MISSING = (r"/rel_pos_[hw]$", r"^backbone/simfp_", r"^rpn/", r"^roi_heads/")


def _abstract(name: str, inputs: dict, **kw) -> dict:
    model = models.build(name, **kw)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1), "dropout": jax.random.key(2)}
    variables = jax.eval_shape(lambda: model.init(rngs, **inputs))
    return nn.meta.unbox(variables["params"])


def _random(abstract, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


@functools.lru_cache(maxsize=None)
def _mae_abstract(patch=16, width=64, img=224):
    return _abstract("mae_vit_tiny", {"imgs": jnp.zeros((1, img, img, 3))}, patch_size=patch,
                     embed_dim=width, img_size=img)


@functools.lru_cache(maxsize=None)
def _vitdet_abstract(**kw):
    x = {"image": jnp.zeros((1, 128, 128, 3)), "image_hw": jnp.array([[128, 128]], jnp.int32)}
    return _abstract("maskrcnn_vitdet_tiny", x, **dict(kw))


@functools.lru_cache(maxsize=None)
def _sam_encoder_abstract():
    """sam_vit_tiny's params (image encoder at grid 16, prompt encoder, mask decoder)."""
    sam = models.build("sam_vit_tiny")
    variables = jax.eval_shape(lambda: sam.init(
        {"params": jax.random.key(0)}, jnp.zeros((1, 256, 256, 3)), jnp.full((1, 2), 256, jnp.int32),
        jnp.zeros((1, 1, 1, 2)), jnp.ones((1, 1, 1), jnp.int32)))
    return nn.meta.unbox(variables["params"])


def _perturbation_check(src, dst, meta, mapping, allow_missing, allow_unexpected):
    """Perturbs every source leaf; returns {source path: the one target path that changed}."""
    base, report = init_maps.apply_mapping(dst, src, meta, mapping, allow_missing, allow_unexpected)
    base_flat = checkpoint.flatten_paths(base)
    src_flat = checkpoint.flatten_paths(src)
    changed_by = {}
    for path in src_flat:
        bumped = dict(src_flat)
        bumped[path] = src_flat[path] + 1.0
        tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(src), list(bumped.values()))
        out = checkpoint.flatten_paths(init_maps.apply_mapping(dst, tree, meta, mapping, allow_missing,
                                                               allow_unexpected)[0])
        changed = [p for p in out if not np.array_equal(out[p], base_flat[p])]
        assert len(changed) <= 1, (path, changed)
        if changed:
            changed_by[path] = changed[0]
    return base, report, changed_by


def _vitdet_target(path: str, mlp=("fc1", "fc2")) -> str:
    return "backbone/net/" + path.replace("mlp/fc1", f"mlp/{mlp[0]}").replace("mlp/fc2", f"mlp/{mlp[1]}")


def test_mae_to_vitdet_every_encoder_weight_lands_once():
    src = _random(_mae_abstract(), 0)
    dst = _random(_vitdet_abstract(), 1)
    meta = {"model": "mae_vit_tiny"}
    base, report, changed_by = _perturbation_check(src, dst, meta, "mae_to_vitdet", VITDET_ALLOW_MISSING,
                                                   MAE_ALLOW_UNEXPECTED)
    src_flat = checkpoint.flatten_paths(src)
    encoder = [p for p in src_flat if not p.startswith(("decoder_", "mask_token", "norm/", "cls_token"))]
    assert sorted(changed_by) == sorted(encoder)
    for p, target in changed_by.items():
        assert target == _vitdet_target(p), (p, target)
    base_flat = checkpoint.flatten_paths(base)
    dst_flat = checkpoint.flatten_paths(dst)
    for p, v in src_flat.items():
        if p in changed_by and p != "pos_embed":
            np.testing.assert_array_equal(base_flat[changed_by[p]], v)  # copied as is
    # what the mapping does not fill keeps its init, and each of those is declared
    for p in report["missing"]:
        np.testing.assert_array_equal(base_flat[p], dst_flat[p])
    assert any(p.endswith("rel_pos_h") for p in report["missing"])
    assert report["transformed"] == {"backbone/net/pos_embed": "pos_embed"}


def _timm_pos(pos: np.ndarray, new_hw, num_prefix: int) -> np.ndarray:
    torch = importorskip("torch")
    from timm.layers import resample_abs_pos_embed

    out = resample_abs_pos_embed(torch.from_numpy(pos), list(new_hw), num_prefix_tokens=num_prefix)
    return out.numpy()


def test_pos_embed_matches_timm_resample_abs_pos_embed():
    importorskip("timm")
    src = _random(_mae_abstract(), 0)  # (1, 1 + 14*14, 64)
    dst = _random(_vitdet_abstract(), 1)  # (1, 8, 8, 64): 14 -> 8, antialiased downsampling
    base, _ = init_maps.apply_mapping(dst, src, {"model": "mae_vit_tiny"}, "mae_to_vitdet",
                                      VITDET_ALLOW_MISSING, MAE_ALLOW_UNEXPECTED)
    got = base["backbone"]["net"]["pos_embed"]
    ref = _timm_pos(src["pos_embed"], (8, 8), 1)[:, 1:].reshape(1, 8, 8, 64)  # class row dropped
    assert got.shape == (1, 8, 8, 64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=POS_ATOL)
    # upsampling (ViTDet-B from a 224 MAE at 1024 would be 14 -> 64), and token layout
    # targets keep the class-token row
    pos = src["pos_embed"]
    for shape in [(1, 1 + 20 * 20, 64), (1, 1 + 5 * 5, 64)]:
        side = int(round((shape[1] - 1) ** 0.5))
        got = init_maps.resample_abs_pos_embed(pos, shape)
        np.testing.assert_allclose(got, _timm_pos(pos, (side, side), 1), rtol=0, atol=POS_ATOL)
        np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    # a grid source with no prefix (SAM's (1, G, G, D)), and the plain (non-antialiased)
    # bicubic of ViTDet's get_abs_pos, to the bit of torch's float32 taps up to rounding
    torch = importorskip("torch")
    grid = pos[:, 1:].reshape(1, 14, 14, 64)
    got = init_maps.resample_abs_pos_embed(grid, (1, 9, 9, 64), "bicubic", False)
    t = torch.from_numpy(grid).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=(9, 9), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=POS_ATOL)
    assert not np.allclose(got, init_maps.resample_abs_pos_embed(grid, (1, 9, 9, 64)), atol=1e-3)


def test_mae_to_sam_encoder_every_encoder_weight_lands_once():
    src = _random(_mae_abstract(), 0)  # grid 14 -> SAM tiny's 16
    dst = _random(_sam_encoder_abstract(), 1)
    allow_missing = (r"/rel_pos_[hw]$", r"^image_encoder/neck_", r"^prompt_encoder/", r"^mask_decoder/")
    meta = {"model": "mae_vit_tiny", "model_kwargs": {"num_heads": 2}}  # SAM tiny's heads
    _, report, changed_by = _perturbation_check(src, dst, meta, "mae_to_sam_encoder",
                                                allow_missing, MAE_ALLOW_UNEXPECTED)
    for p, target in changed_by.items():
        want = "image_encoder/" + p.replace("mlp/fc1", "mlp/lin1").replace("mlp/fc2", "mlp/lin2")
        assert target == want
    assert len(changed_by) == len([p for p in checkpoint.flatten_paths(src)
                                   if p.startswith(("blocks_", "patch_embed", "pos_embed"))])


def test_sam_to_vitdet_brings_the_relative_position_tables():
    src = _random(_sam_encoder_abstract(), 0)
    # SAM tiny has 2 heads; ViTDet tiny with 2 heads has the same head dim
    dst = _random(_vitdet_abstract(vit_num_heads=2), 1)
    allow_missing = (r"^backbone/simfp_", r"^rpn/", r"^roi_heads/")
    allow_unexpected = (r"^image_encoder/neck_", r"^prompt_encoder/", r"^mask_decoder/")
    base, report, changed_by = _perturbation_check(src, dst, {"model": "sam_vit_tiny"}, "sam_to_vitdet",
                                                   allow_missing, allow_unexpected)
    enc = [p for p in checkpoint.flatten_paths(src) if p.startswith("image_encoder/")
           and not p.startswith("image_encoder/neck_")]
    assert sorted(changed_by) == sorted(enc)
    assert changed_by["image_encoder/blocks_1/mlp/lin1/kernel"] == "backbone/net/blocks_1/mlp/fc1/kernel"
    # global block 1: SAM's table (2*16 - 1, K) resized linearly to (2*8 - 1, K)
    t = src["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"]
    got = base["backbone"]["net"]["blocks_1"]["attn"]["rel_pos_h"]
    torch = importorskip("torch")
    ref = torch.nn.functional.interpolate(torch.from_numpy(t).T[None], size=15, mode="linear")[0].T.numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # windowed block 0: same table size, copied
    np.testing.assert_array_equal(base["backbone"]["net"]["blocks_0"]["attn"]["rel_pos_w"],
                                  src["image_encoder"]["blocks_0"]["attn"]["rel_pos_w"])
    assert report["transformed"]["backbone/net/blocks_1/attn/rel_pos_h"] == "rel_pos"


# ----------------------------------------------------------------------------- bad input


def test_other_patch_size_or_width_is_named():
    dst = _vitdet_abstract()
    with pytest.raises(InitMapError, match=r"patch size 8 vs 16"):
        init_maps.apply_mapping(_random(dst, 1), _random(_mae_abstract(patch=8), 0), {"model": "mae_vit_tiny"},
                                "mae_to_vitdet", VITDET_ALLOW_MISSING, MAE_ALLOW_UNEXPECTED)
    with pytest.raises(InitMapError, match=r"width 32 vs 64"):
        init_maps.apply_mapping(_random(dst, 1), _random(_mae_abstract(width=32), 0),
                                {"model": "mae_vit_tiny"}, "mae_to_vitdet", VITDET_ALLOW_MISSING,
                                MAE_ALLOW_UNEXPECTED)


def test_other_head_count_is_named():
    """Same width, other heads: the qkv kernels fit but split into heads differently."""
    dst = _random(_vitdet_abstract(vit_num_heads=2), 1)
    src = _random(_mae_abstract(), 0)
    args = ("mae_to_vitdet", VITDET_ALLOW_MISSING, MAE_ALLOW_UNEXPECTED)
    with pytest.raises(InitMapError, match=r"has 4 attention heads, the config's model 2"):
        init_maps.apply_mapping(dst, src, {"model": "mae_vit_tiny"}, *args)  # the registry's 4 heads
    init_maps.apply_mapping(dst, src, {"model": "mae_vit_tiny", "model_kwargs": {"num_heads": 2}}, *args)
    # a meta that does not describe the tensors (another width) cannot vouch for their heads
    with pytest.raises(InitMapError, match=r"heads is not in its tensors .* width 64"):
        init_maps.apply_mapping(dst, src, {"model": "mae_vit_b16"}, *args)
    # SAM -> ViTDet: the relative position tables tell both sides' heads
    sam = _random(_sam_encoder_abstract(), 0)  # 2 heads
    with pytest.raises(InitMapError, match=r"has 2 attention heads, the config's model 4"):
        init_maps.apply_mapping(_random(_vitdet_abstract(), 1), sam, {"model": "sam_vit_tiny"}, "sam_to_vitdet",
                                (r"^backbone/simfp_", r"^rpn/", r"^roi_heads/"),
                                (r"^image_encoder/neck_", r"^prompt_encoder/", r"^mask_decoder/"))


def test_checkpoint_of_another_family_is_named():
    dst = _random(_vitdet_abstract(), 1)
    with pytest.raises(InitMapError, match=r"'mask_rcnn_r50_fpn' model; this mapping reads"):
        init_maps.apply_mapping(dst, _random(_mae_abstract(), 0), {"model": "mask_rcnn_r50_fpn"},
                                "mae_to_vitdet", VITDET_ALLOW_MISSING, MAE_ALLOW_UNEXPECTED)
    with pytest.raises(InitMapError, match="unknown init_from.mapping 'mae_to_rcnn'"):
        init_maps.resolve("mae_to_rcnn")


def test_undeclared_missing_and_unused_paths_are_listed():
    dst = _random(_vitdet_abstract(), 1)
    src = _random(_mae_abstract(), 0)
    with pytest.raises(InitMapError, match=r"not filled .*rel_pos_h") as e:
        init_maps.apply_mapping(dst, src, {"model": "mae_vit_tiny"}, "mae_to_vitdet",
                                (r"^backbone/simfp_", r"^rpn/", r"^roi_heads/"), MAE_ALLOW_UNEXPECTED)
    assert "not used (not declared in allow_unexpected): []" in str(e.value)
    with pytest.raises(InitMapError, match=r"not used .*decoder_blocks_0"):
        init_maps.apply_mapping(dst, src, {"model": "mae_vit_tiny"}, "mae_to_vitdet", VITDET_ALLOW_MISSING,
                                (r"^norm/", r"^cls_token$", r"^mask_token$"))
    # a deeper checkpoint: its extra blocks have no target
    deep = dict(src)
    deep["blocks_4"] = src["blocks_0"]
    with pytest.raises(InitMapError, match=r"(?s)checkpoint depth 5, model depth 4.*blocks_4/.*no such parameter"):
        init_maps.apply_mapping(dst, deep, {"model": "mae_vit_tiny"}, "mae_to_vitdet", VITDET_ALLOW_MISSING,
                                MAE_ALLOW_UNEXPECTED)


def test_config_rules_replace_the_named_mapping_and_merge_without_one():
    dst = _random(_vitdet_abstract(), 1)
    src = _random(_mae_abstract(), 0)
    cfg = ml_collections.ConfigDict({
        "mapping": "mae_to_vitdet", "pos_embed": ("bicubic", False),
        "allow_missing": VITDET_ALLOW_MISSING + (r"/mlp/",), "allow_unexpected": MAE_ALLOW_UNEXPECTED + (r"/mlp/",),
        "rules": ((r"{src}blocks_(\d+)/(norm1|norm2|attn/qkv|attn/proj)/(\w+)", r"{dst}blocks_\1/\2/\3"),
                  (r"pos_embed", r"{dst}pos_embed"), (r"patch_embed/proj/(\w+)", r"{dst}patch_embed/proj/\1"))})
    params, report = init_maps.init_params(dst, src, {"model": "mae_vit_tiny"}, cfg)
    assert "backbone/net/blocks_0/mlp/fc1/kernel" in report["missing"]
    assert "blocks_0/mlp/fc1/kernel" in report["unexpected"]
    want = init_maps.resample_abs_pos_embed(src["pos_embed"], (1, 8, 8, 64), "bicubic", False)
    np.testing.assert_array_equal(params["backbone"]["net"]["pos_embed"], want)
    # no mapping: paths as they are (merge_params)
    plain = ml_collections.ConfigDict({"allow_missing": (), "allow_unexpected": ()})
    same, rep = init_maps.init_params(src, src, {"model": "mae_vit_tiny"}, plain)
    assert rep["missing"] == [] and rep["unexpected"] == []


def test_vitdet_shapes_config_initialises_from_an_mae_checkpoint(tmp_path):
    """configs/maskrcnn/vitdet_shapes.py:mae declares everything an MAE of
    configs/mae/shapes.py leaves unfilled or unused: restore_or_init goes through."""
    from configs.mae import shapes as mae_shapes
    from configs.maskrcnn import vitdet_shapes
    from segjax import train_loop

    mae_cfg = mae_shapes.get_config("runlocal")
    mae = models.build(mae_cfg.model.name, **mae_cfg.model.kwargs)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    params = nn.meta.unbox(jax.jit(mae.init)(rngs, jnp.zeros((1, 128, 128, 3)))["params"])
    checkpoint.save_params(tmp_path / "mae", params, {"model": mae_cfg.model.name,
                                                      "model_kwargs": dict(mae_cfg.model.kwargs)})
    c = vitdet_shapes.get_config("mae,runlocal")
    c.init_from.path = str(tmp_path / "mae")
    train_loop.validate_config(c)
    trainer = train_loop.Trainer(c)
    state, info = train_loop.restore_or_init(trainer, checkpoint.TrainCheckpointer(tmp_path / "w", 10, 1))
    rep = info["init_from"]
    assert "backbone/net/blocks_3/mlp/fc2/kernel" in rep["loaded"] and "decoder_pred/kernel" in rep["unexpected"]
    got = np.asarray(jax.device_get(state["params"]["backbone"]["net"]["blocks_0"]["attn"]["qkv"]["kernel"]))
    np.testing.assert_array_equal(got, params["blocks_0"]["attn"]["qkv"]["kernel"])
    # the 8 x 8 grid of both: the class row dropped, the table copied
    pos = np.asarray(jax.device_get(state["params"]["backbone"]["net"]["pos_embed"]))
    np.testing.assert_array_equal(pos, np.asarray(params["pos_embed"])[:, 1:].reshape(1, 8, 8, 64))
