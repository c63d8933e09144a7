"""SAM model contracts: shapes, absent-token padding, bf16, other input sizes, the
windowed / rel-pos pieces against the official functions, and TPU / GPU lowering."""

from __future__ import annotations

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models.sam import ABSENT
from segjax.models.vit import get_rel_pos, rel_pos_attention, window_partition, window_unpartition
from segjax.ops.resample import cubic_matrix, linear_matrix
from segjax.testing import importorskip


def _inputs(b=2, p=3, t=4, s=256, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (b, s, s, 3)).astype(np.float32)
    hw = np.array([[s, s], [s * 3 // 4, s]][:b], np.int32)
    coords = rng.uniform(0, s, (b, p, t, 2)).astype(np.float32)
    labels = rng.choice(np.array([0, 1, -1, 2, 3], np.int32), (b, p, t))
    return images, hw, coords, labels


@pytest.fixture(scope="module")
def tiny():
    model = models.build("sam_vit_tiny")
    images, hw, coords, labels = _inputs()
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, hw, coords, labels))
    # non-trivial weights where the init is zero (rel-pos, position tables)
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def test_shapes_and_every_param_created(tiny):
    model, variables = tiny
    images, hw, coords, labels = _inputs()
    out = jax.jit(model.apply)(variables, images, hw, coords, labels)
    assert out["image_embeddings"].shape == (2, 16, 16, 32)
    assert out["low_res_logits"].shape == (2, 3, 3, 64, 64) and out["low_res_logits"].dtype == jnp.float32
    assert out["iou_predictions"].shape == (2, 3, 3)
    single = jax.jit(lambda v, e, c, lab: model.apply(v, e, c, lab, multimask_output=False,
                                                      method=model.predict_masks))
    one = single(variables, out["image_embeddings"], coords, labels)
    assert one["low_res_logits"].shape == (2, 3, 1, 64, 64) and one["iou_predictions"].shape == (2, 3, 1)
    p = variables["params"]
    assert set(p["prompt_encoder"]) >= {"mask_downscaling_0", "mask_downscaling_6", "point_embeddings_3",
                                        "not_a_point_embed", "no_mask_embed", "pe_layer"}
    assert p["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"].shape == (31, 32)  # global: 2 * 16 - 1
    assert p["image_encoder"]["blocks_0"]["attn"]["rel_pos_h"].shape == (7, 32)  # window 4
    # pixels outside input_hw are ignored
    emb = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=model.embed_image))
    noisy = images.copy()
    noisy[1, 192:] = 0.0
    np.testing.assert_array_equal(emb(variables, images, hw)[1], emb(variables, noisy, hw)[1])


def test_absent_padding_does_not_change_outputs(tiny):
    model, variables = tiny
    images, hw, coords, labels = _inputs(b=1, p=2, t=3)
    emb = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=model.embed_image))(variables, images, hw)
    pred = jax.jit(lambda v, e, c, lab: model.apply(v, e, c, lab, method=model.predict_masks))
    ref = pred(variables, emb, coords, labels)
    # 3 absent tokens: before, between and after the real ones, with garbage coordinates
    pc = np.full((1, 2, 6, 2), 1e4, np.float32)
    pl = np.full((1, 2, 6), ABSENT, np.int32)
    pc[:, :, [1, 2, 4]], pl[:, :, [1, 2, 4]] = coords, labels
    out = pred(variables, emb, pc, pl)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=1e-5 * float(np.abs(ref[k]).max()))
    # and absent tokens do matter when they are not absent
    pl2 = np.where(pl == ABSENT, 1, pl)
    assert np.abs(pred(variables, emb, pc, pl2)["low_res_logits"] - ref["low_res_logits"]).max() > 1e-3


def test_all_masks_output_equals_the_two_outputs(tiny):
    """multimask_output=None (the rollout's first round: both heads from one decoder run)
    returns mask 0 then masks 1..3, equal to the single- and multi-mask calls, with and
    without a mask prompt."""
    model, variables = tiny
    images, hw, coords, labels = _inputs()
    emb = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=model.embed_image))(variables, images, hw)
    mask_in = np.random.default_rng(3).normal(0, 4, (2, 3, 64, 64, 1)).astype(np.float32)
    pred = jax.jit(lambda v, e, c, lab, mi, mm: model.apply(v, e, c, lab, mi, None, mm, method=model.predict_masks),
                   static_argnums=5)
    for mi in (None, mask_in):
        both = pred(variables, emb, coords, labels, mi, None)
        assert both["low_res_logits"].shape == (2, 3, 4, 64, 64) and both["iou_predictions"].shape == (2, 3, 4)
        ref = {k: np.concatenate([a, b], axis=2) for (k, a), b in zip(
            pred(variables, emb, coords, labels, mi, False).items(),
            pred(variables, emb, coords, labels, mi, True).values())}
        for k in ref:
            np.testing.assert_allclose(both[k], ref[k], rtol=0, atol=1e-5 * float(np.abs(ref[k]).max()))
        assert np.abs(ref["low_res_logits"][:, :, 0] - ref["low_res_logits"][:, :, 1]).max() > 1e-2


def test_fourier_matrix_gets_no_gradient(tiny):
    """The random-Fourier matrix is a fixed buffer (segment_anything, sam2): exactly zero
    gradient, while the rest of the prompt encoder does get one."""
    model, variables = tiny
    images, hw, coords, labels = _inputs()
    emb = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=model.embed_image))(variables, images, hw)
    mask_in = np.random.default_rng(5).normal(0, 4, (2, 3, 64, 64, 1)).astype(np.float32)

    def loss(p):
        out = model.apply({"params": p}, emb, coords, labels, mask_in, method=model.predict_masks)
        return jnp.sum(out["low_res_logits"] ** 2) + jnp.sum(out["iou_predictions"])

    g = jax.jit(jax.grad(loss))(variables["params"])["prompt_encoder"]
    assert not np.asarray(g["pe_layer"]["positional_encoding_gaussian_matrix"]).any()
    assert np.abs(np.asarray(g["mask_downscaling_0"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["point_embeddings_1"]["embedding"])).max() > 0


def test_mask_downscaling_equals_strided_convs(tiny):
    """The prompt encoder's mask net (`PatchConv`s on one rearrangement of the input)
    equals the reference's Conv2d(k2 s2) -> LayerNorm2d -> GELU -> Conv2d(k2 s2) ->
    LayerNorm2d -> GELU -> Conv2d(1x1), here as lax convolutions on the same params."""
    from segjax.models.vit import gelu_erf

    model, variables = tiny
    masks = np.random.default_rng(4).normal(0, 4, (3, 64, 64, 1)).astype(np.float32)
    out = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, y: m.prompt_encoder.embed_masks(y)))(
        variables, masks)
    pe = variables["params"]["prompt_encoder"]

    def conv(x, name, k):
        y = jax.lax.conv_general_dilated(x, pe[name]["kernel"], (k, k), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return y + pe[name]["bias"]

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-6) * pe[name]["scale"] + pe[name]["bias"]

    x = gelu_erf(ln(conv(masks, "mask_downscaling_0", 2), "mask_downscaling_1"))
    x = gelu_erf(ln(conv(x, "mask_downscaling_3", 2), "mask_downscaling_4"))
    ref = np.asarray(conv(x, "mask_downscaling_6", 1))
    assert out.shape == ref.shape == (3, 16, 16, 32)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_bf16_close_to_fp32(tiny):
    model, variables = tiny
    m16 = models.build("sam_vit_tiny", dtype=jnp.bfloat16)
    images, hw, coords, labels = _inputs()
    ref = jax.jit(model.apply)(variables, images, hw, coords, labels)
    out = jax.jit(m16.apply)(variables, images, hw, coords, labels)
    for k in ref:
        assert out[k].dtype == jnp.float32 and bool(jnp.isfinite(out[k]).all()), k
    rel = {k: float(jnp.abs(out[k] - ref[k]).max() / jnp.abs(ref[k]).max()) for k in ref}
    print("bf16 vs fp32 rel err:", rel)
    assert max(rel.values()) < 0.1, rel
    agree = float(((out["low_res_logits"] > 0) == (ref["low_res_logits"] > 0)).mean())
    assert agree > 0.97, agree


def test_other_input_size_runs(tiny):
    model, variables = tiny
    small = models.build("sam_vit_tiny", img_size=160)  # grid 10: windows of 4 pad to 12
    images, hw, coords, labels = _inputs(s=160)
    out = jax.jit(small.apply)(variables, images, hw, coords, labels)
    assert out["image_embeddings"].shape == (2, 10, 10, 32)
    assert out["low_res_logits"].shape == (2, 3, 3, 40, 40)
    assert bool(jnp.isfinite(out["low_res_logits"]).all())


def test_window_partition_roundtrip():
    x = jnp.arange(2 * 10 * 7 * 3, dtype=jnp.float32).reshape(2, 10, 7, 3)
    w, pad_hw = window_partition(x, 4)
    assert w.shape == (2 * 3 * 2, 4, 4, 3) and pad_hw == (12, 8)
    np.testing.assert_array_equal(window_unpartition(w, 4, pad_hw, (10, 7)), x)


def test_rel_pos_attention_query_blocks_equal_one_block():
    """Blocked attention (lax.map over heads, then query rows; used at full size) == one block."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 8 * 6, 2, 16)), jnp.float32) for _ in range(3))
    rh, rw = (jnp.asarray(rng.normal(size=(s, 16)), jnp.float32) for s in (15, 9))  # resized to 15, 11
    one = rel_pos_attention(q, k, v, rh, rw, (8, 6), chunk_bytes=2**40)
    # one head and one row per block; one head, four rows; one head, all rows
    for chunk in (1, 3 * 6 * 48 * 4 * 4, 3 * 48 * 48 * 4):
        np.testing.assert_allclose(rel_pos_attention(q, k, v, rh, rw, (8, 6), chunk_bytes=chunk), one,
                                   rtol=0, atol=1e-5 * float(jnp.abs(one).max()))


# ----------------------------------------------------------------------------- vs official


def test_windowing_and_rel_pos_match_official():
    torch = importorskip("torch")
    ie = importorskip("segment_anything.modeling.image_encoder")
    import torch.nn.functional as F

    x = np.random.default_rng(0).normal(size=(2, 10, 7, 3)).astype(np.float32)
    ref_w, ref_pad = ie.window_partition(torch.from_numpy(x), 4)
    ours_w, pad = window_partition(jnp.asarray(x), 4)
    assert pad == tuple(ref_pad)
    np.testing.assert_array_equal(ours_w, ref_w.numpy())
    table = np.random.default_rng(1).normal(size=(31, 8)).astype(np.float32)
    for q, k in ((16, 16), (10, 10), (20, 20), (8, 12)):
        ref = ie.get_rel_pos(q, k, torch.from_numpy(table)).numpy()
        np.testing.assert_allclose(get_rel_pos(q, k, jnp.asarray(table)), ref, rtol=1e-6, atol=1e-6)
    for n_in, n_out in ((31, 19), (7, 13), (5, 5)):
        v = torch.eye(n_in)[None]  # each column: one basis vector
        lin = F.interpolate(v, size=n_out, mode="linear")[0].T.numpy()
        np.testing.assert_allclose(linear_matrix(n_in, n_out), lin, atol=1e-6)
    for n_in, n_out in ((16, 10), (64, 40), (14, 32)):
        v = torch.eye(n_in)[None, None]  # (1, 1, n_in, n_in): resize rows only
        cub = F.interpolate(v, size=(n_out, n_in), mode="bicubic", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(cubic_matrix(n_in, n_out), cub, atol=1e-6)


def test_other_input_size_matches_official_with_resized_pos_embed(tmp_path):
    """The official encoder runs at 160 once its pos_embed is bicubic-resized by hand
    (its get_rel_pos resizes the global tables itself): ours must agree."""
    torch = importorskip("torch")
    import torch.nn.functional as F

    from segjax.convert import sam as conv
    from segjax.testing.sam_official import TINY, make_official

    official = make_official(TINY, seed=3)
    sd = {k: v.numpy() for k, v in official.state_dict().items()}
    params, meta, _ = conv.from_state_dict(sd)
    ours = models.build(meta["model"], **dict(meta["model_kwargs"], img_size=160))
    x = np.random.default_rng(0).uniform(0, 255, (1, 160, 160, 3)).astype(np.float32)
    emb = jax.jit(lambda p, x: ours.apply(p, x, np.array([[160, 160]]), method=ours.embed_image))(
        {"params": params}, x)
    enc = official.image_encoder
    with torch.no_grad():
        enc.pos_embed = torch.nn.Parameter(F.interpolate(
            enc.pos_embed.permute(0, 3, 1, 2), size=(10, 10), mode="bicubic", align_corners=False
        ).permute(0, 2, 3, 1))
        xt = (torch.from_numpy(x).permute(0, 3, 1, 2) - official.pixel_mean) / official.pixel_std  # no pad
        ref = enc(xt).permute(0, 2, 3, 1).numpy()
    err = float(np.abs(np.asarray(emb) - ref).max() / np.abs(ref).max())
    assert err < 1e-5, err


def test_full_size_variants_match_official_shapes():
    """sam_vit_b/l/h parameter shapes equal the official models' (built on the meta
    device: no memory), through the converter's rename table."""
    torch = importorskip("torch")
    from segment_anything import sam_model_registry

    from segjax.convert import sam as conv
    from segjax.convert.common import rename

    for name in ("b", "l", "h"):
        with torch.device("meta"):
            ref = sam_model_registry[f"vit_{name}"]().state_dict()
        # zero-stride stand-ins: the layout transposes are views, nothing is allocated
        fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.items()}
        flat, report = rename(fake, conv.OFFICIAL_RULES)
        assert report.ok and len(report.used) == len(ref), report.summary()
        ours = conv._abstract_leaves(f"sam_vit_{name}", {})
        assert {k: tuple(v.shape) for k, v in flat.items()} == ours, name


def test_parameter_tree_is_the_recorded_one():
    """The parameter names and shapes that converters and checkpoints rely on (sam_vit_b,
    recorded): the same through every entry point, the decoder holding every
    hypernetwork's parameters also when it returns one mask."""
    m = models.build("sam_vit_b")
    s, e, c = m.img_size, m.embedding_size, m.prompt_embed_dim
    coords, labels = jnp.zeros((1, 2, 3, 2)), jnp.ones((1, 2, 3), jnp.int32)

    def listing(init):
        tree = nn.meta.unbox(jax.eval_shape(init))["params"]
        return sorted(f"{'/'.join(str(k.key) for k in path)} {tuple(x.shape)} {x.dtype}"
                      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0])

    full = listing(lambda: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.full((1, 2), s, jnp.int32),
                                  coords, labels))
    decoder = [x for x in full if x.startswith("mask_decoder/")]
    for multimask in (True, False):
        ours = listing(lambda mm=multimask: m.init(jax.random.key(0), jnp.zeros((1, e, e, c)), coords, labels,
                                                   multimask_output=mm, method="predict_masks"))
        assert [x for x in ours if x.startswith("mask_decoder/")] == decoder, multimask
    assert (len(full), len(decoder)) == (314, 120)
    digest = hashlib.sha256("\n".join(full).encode()).hexdigest()
    assert digest == "fd8d34d26b781b666416454ec7faf5c72962f99502cf3dcf2d261926c0028434", "\n".join(full)


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_lowers_for_tpu_and_cuda(dtype):
    m = models.build("sam_vit_tiny", dtype=dtype)
    images, hw, coords, labels = _inputs(b=1, p=2, t=3)
    params = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.key(0), images, hw, coords, labels)))
    sds = jax.ShapeDtypeStruct
    embed = jax.jit(lambda p, x, hw: m.apply(p, x, hw, method=m.embed_image))
    exp = jax.export.export(embed, platforms=("tpu", "cuda"))(
        params, sds((4, 256, 256, 3), jnp.float32), sds((4, 2), jnp.int32))
    assert exp.platforms == ("tpu", "cuda")
    assert ("bf16" in exp.mlir_module()) == (dtype == jnp.bfloat16)
    pred = jax.jit(lambda p, e, c, lab, mi, hm: m.apply(p, e, c, lab, mi, hm, method=m.predict_masks))
    exp = jax.export.export(pred, platforms=("tpu", "cuda"))(
        params, sds((4, 16, 16, 32), jnp.float32), sds((4, 64, 8, 2), jnp.float32), sds((4, 64, 8), jnp.int32),
        sds((4, 64, 64, 64, 1), jnp.float32), sds((4, 64), jnp.bool_))
    assert exp.platforms == ("tpu", "cuda")
    assert ("bf16" in exp.mlir_module()) == (dtype == jnp.bfloat16)
