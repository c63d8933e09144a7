"""MAE / ViT converters against the PyTorch references (transformers, timm, official MAE).

Parity is fp32 and measured as max |ours - reference| / max |reference| (REL_TOL);
masks must be identical. Tiny models run by default; B/16 under `slow`.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
transformers = importorskip("transformers")
timm = importorskip("timm")

from safetensors.numpy import load_file, save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from segjax import models
from segjax.checkpoint import flatten_paths, load_params, merge_params
from segjax.convert import ConversionError, common
from segjax.convert import mae as conv
from segjax.convert.__main__ import main as cli
from segjax.testing.images import masking_noise, photo_batch
from segjax.testing.mae_official import OfficialMAE, mae_forward_encoder, randomize_, sincos_table

REL_TOL = 1e-5  # fp32 parity target: relative to the reference's largest magnitude
TINY = dict(img=32, patch=4, dim=64, depth=3, heads=4, dec_dim=32, dec_depth=2, dec_heads=4)
torch.set_num_threads(1)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_close(name: str, ours, ref, tol: float = REL_TOL) -> float:
    err = rel_err(ours, ref)
    print(f"{name}: max abs err {np.abs(np.asarray(ours) - np.asarray(ref)).max():.3e}, rel {err:.3e}")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
    return err


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def run_mae(ckpt_dir, images, noise):
    params, meta = load_params(ckpt_dir)
    model = models.build(meta["model"], **meta["model_kwargs"])
    out = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(params, images, noise)
    return {k: np.asarray(v) for k, v in out.items()}, params, meta


def hf_config(s=TINY, norm_pix_loss=False, **kw):
    return transformers.ViTMAEConfig(
        hidden_size=s["dim"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
        intermediate_size=4 * s["dim"], image_size=s["img"], patch_size=s["patch"],
        decoder_hidden_size=s["dec_dim"], decoder_num_hidden_layers=s["dec_depth"],
        decoder_num_attention_heads=s["dec_heads"], decoder_intermediate_size=4 * s["dec_dim"],
        norm_pix_loss=norm_pix_loss, **kw)


def make_hf(directory, s=TINY, norm_pix_loss=False, seed=0):
    """A seeded random ViTMAEForPreTraining saved with save_pretrained (safetensors)."""
    model = transformers.ViTMAEForPreTraining(hf_config(s, norm_pix_loss)).eval()
    randomize_(model, seed)
    grid = s["img"] // s["patch"]
    with torch.no_grad():  # transformers 5.x leaves fresh tables at zero; MAE uses sin-cos
        model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(sincos_table(s["dim"], grid))[None])
        model.decoder.decoder_pos_embed.copy_(torch.from_numpy(sincos_table(s["dec_dim"], grid))[None])
    model.save_pretrained(directory)
    return model


def hf_forward(model, images, noise):
    with torch.no_grad():
        out = model(pixel_values=nchw(images), noise=torch.from_numpy(noise))
    return {"loss": out.loss.numpy(), "pred": out.logits.numpy(), "mask": out.mask.numpy()}


def compare_mae(tag, ours, ref):
    errs = {k: assert_close(f"{tag} {k}", ours[k], ref[k]) for k in ("loss", "pred")}
    np.testing.assert_array_equal(ours["mask"], ref["mask"])
    return errs


@pytest.fixture(scope="module")
def images():
    return photo_batch(TINY["img"])


@pytest.fixture(scope="module")
def noise():
    return masking_noise(2, (TINY["img"] // TINY["patch"]) ** 2)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_pretraining_parity(tmp_path, images, noise, norm_pix_loss):
    ref_model = make_hf(tmp_path / "hf", norm_pix_loss=norm_pix_loss)
    assert cli(["mae", str(tmp_path / "hf"), str(tmp_path / "sj")]) == 0
    ours, _, meta = run_mae(tmp_path / "sj", images, noise)
    assert meta["params"] == "mae" and meta["has_decoder"]
    assert meta["model_kwargs"]["norm_pix_loss"] is norm_pix_loss
    assert meta["model_kwargs"]["ln_eps"] == 1e-12  # transformers' default, from config.json
    assert meta["source"]["num_heads_from"] == "config.json"
    compare_mae(f"hf norm_pix={norm_pix_loss}", ours, hf_forward(ref_model, images, noise))


def test_hf_namings_convert_identically(tmp_path):
    """Hub (legacy), transformers-5 module and transformers-5 saved spellings."""
    model = make_hf(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))  # 5.x save_pretrained names
    module_sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(".layers.0.attention.q_proj." in k for k in module_sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    params, meta, _ = conv.from_state_dict(module_sd, config=cfg)
    base = flatten_paths(params)
    legacy = conv.to_state_dict(params, meta, "hf")[0]
    assert any("decoder.decoder_layers.0.attention.attention.query" in k for k in legacy)
    for sd in (saved, legacy):
        other = flatten_paths(conv.from_state_dict(sd, config=cfg)[0])
        assert other.keys() == base.keys()
        for k in base:
            np.testing.assert_array_equal(other[k], base[k], err_msg=k)


def test_hf_missing_decoder_pos_embed_is_generated(tmp_path):
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    make_hf(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del sd["decoder.decoder_pos_embed"]
    os.makedirs(tmp_path / "cut")
    save_file(sd, str(tmp_path / "cut" / "model.safetensors"))
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    meta, report = conv.convert(tmp_path / "cut", tmp_path / "sj")
    assert any("decoder_pos_embed" in g for g in meta["source"]["generated"])
    assert any("generated decoder_pos_embed" in n for n in report.notes)
    table = load_params(tmp_path / "sj")[0]["decoder_pos_embed"][0]
    # the installed transformers builds (h, w) and rotates the halves to the official order
    grid = TINY["img"] // TINY["patch"]
    hf = build_2d_sinusoidal_position_embedding(grid, grid, TINY["dec_dim"], cls_token=True).numpy()
    half = hf.shape[-1] // 2
    hf = np.concatenate([hf[:, half:], hf[:, :half]], axis=-1)
    np.testing.assert_allclose(table, hf, atol=1e-6)
    np.testing.assert_allclose(table, sincos_table(TINY["dec_dim"], grid), atol=1e-6)


# ----------------------------------------------------------------------------- timm


def tiny_timm(seed, **kw):
    s = TINY
    kw = {"qkv_bias": True, **kw}
    model = TimmViT(img_size=s["img"], patch_size=s["patch"], embed_dim=s["dim"], depth=s["depth"],
                    num_heads=s["heads"], **kw).eval()
    randomize_(model, seed, keep=())
    return model


def test_timm_encoder_latent_parity(tmp_path, images, noise):
    ref = tiny_timm(1, num_classes=0, global_pool="token")
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    meta, _ = conv.convert(tmp_path / "vit.pth", tmp_path / "sj", num_heads=TINY["heads"])
    assert meta["params"] == "mae_encoder" and meta["has_decoder"] is False
    params, meta = load_params(tmp_path / "sj")
    assert not any(k.startswith(("decoder_", "mask_token")) for k in flatten_paths(params))
    model = models.build(meta["model"], **meta["model_kwargs"])
    init = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], noise=noise[:1])))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init["params"])  # decoder unused
    full, report = merge_params(init, params, allow_missing=[r"^decoder_", r"^mask_token$"])
    assert all(k.startswith(("decoder_", "mask_token")) for k in report["missing"])
    latent, mask, _ = jax.jit(lambda p, x, n: model.apply(
        {"params": p}, x, n, 0.75, method="forward_encoder"))(full, images, noise)
    with torch.no_grad():
        ref_latent, ref_mask, _ = mae_forward_encoder(ref, nchw(images), torch.from_numpy(noise), 0.75)
    assert_close("timm encoder latent", latent, ref_latent.numpy())
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    # back to timm: strict load, the same tensors
    path = conv.export(tmp_path / "sj", tmp_path / "back.pth", "timm")
    _, extra = conv.to_state_dict(params, meta, "timm")
    back = torch.load(path, weights_only=True)
    TimmViT(**extra["timm_kwargs"]).load_state_dict(back, strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    # and to transformers' encoder-only ViTMAEModel
    hf_dir = conv.export(tmp_path / "sj", tmp_path / "hf", "hf")
    hf, info = transformers.ViTMAEModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        hf_latent = hf.eval()(pixel_values=nchw(images), noise=torch.from_numpy(noise)).last_hidden_state
    assert_close("segjax->hf ViTMAEModel latent", hf_latent.numpy(), ref_latent.numpy())


@pytest.fixture(scope="module")
def timm_classifier(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("timm_cls")
    ref = tiny_timm(2, num_classes=10, global_pool="avg")
    torch.save(ref.state_dict(), d / "vit_cls.pth")
    meta, _ = conv.convert(d / "vit_cls.pth", d / "sj", num_heads=TINY["heads"])
    with torch.no_grad():
        logits = ref(nchw(images)).numpy()
    return d / "sj", meta, logits


def classifier_logits(ckpt_dir, images):
    params, meta = load_params(ckpt_dir)
    model = models.build(meta["model"], **meta["model_kwargs"])
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])(params, images))


def test_timm_classifier_logits_parity(timm_classifier, images):
    ckpt, meta, ref_logits = timm_classifier
    assert meta["params"] == "vit_classifier" and meta["model"].startswith("vit_")
    assert meta["model_kwargs"]["global_pool"] is True and meta["model_kwargs"]["num_classes"] == 10
    assert_close("timm classifier logits", classifier_logits(ckpt, images), ref_logits)


def test_reverse_timm_loads_strict(timm_classifier, images, tmp_path):
    ckpt, _, ref_logits = timm_classifier
    path = conv.export(ckpt, tmp_path / "vit.safetensors", "timm")
    _, meta = load_params(ckpt)
    sd, extra = conv.to_state_dict(load_params(ckpt)[0], meta, "timm")
    written = load_file(path)
    assert written.keys() == sd.keys() and "fc_norm.weight" in sd and "norm.weight" not in sd
    model = TimmViT(**extra["timm_kwargs"]).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    with torch.no_grad():
        assert_close("segjax->timm logits", model(nchw(images)).numpy(), ref_logits)


# ----------------------------------------------------------------------------- official MAE


@pytest.fixture(scope="module")
def official_full(tmp_path_factory, images, noise):
    """A random official-format `_full` checkpoint (norm_pix_loss, as the released ones)."""
    d = tmp_path_factory.mktemp("official")
    s = TINY
    ref = OfficialMAE(s["img"], s["patch"], 3, s["dim"], s["depth"], s["heads"], s["dec_dim"],
                      s["dec_depth"], s["dec_heads"], norm_pix_loss=True).eval()
    randomize_(ref, 3)
    torch.save({"model": ref.state_dict()}, d / "mae_pretrain_vit_tiny_full.pth")
    assert cli(["mae", str(d / "mae_pretrain_vit_tiny_full.pth"), str(d / "sj"),
                "--num-heads", "4", "--decoder-num-heads", "4"]) == 0
    with torch.no_grad():
        loss, pred, mask = ref(nchw(images), torch.from_numpy(noise))
    return d / "sj", {"loss": loss.numpy(), "pred": pred.numpy(), "mask": mask.numpy()}


def test_official_full_parity(official_full, images, noise):
    ckpt, ref = official_full
    ours, _, meta = run_mae(ckpt, images, noise)
    assert meta["model_kwargs"]["norm_pix_loss"] is True  # from the `_full` file name
    assert meta["model_kwargs"]["ln_eps"] == 1e-6
    compare_mae("official _full", ours, ref)


def test_reverse_official_round_trip(official_full, tmp_path):
    ckpt, _ = official_full
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    assert cli(["mae", "--reverse", str(ckpt), str(path), "--format", "official"]) == 0
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model"} and "blocks.0.attn.qkv.weight" in obj["model"]
    OfficialMAE(32, 4, 3, 64, 3, 4, 32, 2, 4).load_state_dict(obj["model"], strict=True)
    conv.convert(path, tmp_path / "back", num_heads=4, decoder_num_heads=4)
    a, meta_a = load_params(ckpt)
    b, meta_b = load_params(tmp_path / "back")
    assert meta_a["model_kwargs"] == meta_b["model_kwargs"]
    fa, fb = flatten_paths(a), flatten_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_reverse_hf_loads_and_matches(official_full, images, noise, tmp_path):
    ckpt, ref = official_full
    out = conv.export(ckpt, tmp_path / "hf", "hf")
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    compare_mae("segjax->hf (from_pretrained)", hf_forward(model.eval(), images, noise), ref)
    # transformers>=5 module names load with strict=True
    params, meta = load_params(ckpt)
    sd, extra = conv.to_state_dict(params, meta, "hf", hf_naming="v5")
    strict = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**extra["config"])).eval()
    strict.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    compare_mae("segjax->hf (strict)", hf_forward(strict, images, noise), ref)


def test_finetuning_loads_both_mae_kinds_by_path(official_full, tmp_path):
    """`init_from`: a classifier takes the encoder of full and encoder-only checkpoints."""
    full, _ = official_full
    params, _ = load_params(full)
    enc = {k: v for k, v in params.items() if not k.startswith(("decoder_", "mask_token"))}
    vit = models.build("vit_tiny", depth=3, num_classes=5, img_size=32)
    init = nn.meta.unbox(jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
    for loaded in (params, enc):
        merged, report = merge_params(init["params"], loaded, allow_missing=[r"^head/", r"^fc_norm/"],
                                      allow_unexpected=[r"^norm/", r"^decoder_", r"^mask_token$"])
        assert "blocks_2/attn/qkv/kernel" in report["loaded"]
        np.testing.assert_array_equal(merged["pos_embed"], params["pos_embed"])


# ----------------------------------------------------------------------------- every config field

# A small base ViTMAEConfig; each case changes fields that change the network.
HF_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               image_size=32, patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=2,
               decoder_num_attention_heads=4, decoder_intermediate_size=128)
HF_CASES = {
    # the issue: decoder MLP ratio (1.5) != encoder's (4)
    "decoder_mlp_ratio": dict(decoder_intermediate_size=48),
    # widths whose ratio is not a "nice" float: int(28 * (61 / 28)) == 60 in float64
    "odd_mlp_widths": dict(hidden_size=28, intermediate_size=61, decoder_hidden_size=24,
                           decoder_num_attention_heads=3, decoder_intermediate_size=37),
    "decoder_shape": dict(num_hidden_layers=3, decoder_hidden_size=48, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=6, decoder_intermediate_size=96),
    "no_qkv_bias_eps": dict(qkv_bias=False, layer_norm_eps=1e-5, norm_pix_loss=True),
    "relu_mask_ratio": dict(hidden_act="relu", mask_ratio=0.5, intermediate_size=128),
    "gelu_new_norm_pix": dict(hidden_act="gelu_new", norm_pix_loss=True),
    "silu": dict(hidden_act="silu", layer_norm_eps=1e-6),
    "image_patch_channels": dict(image_size=48, patch_size=8, num_channels=1, mask_ratio=0.6,
                                 decoder_intermediate_size=64),
}
# ViTMAEConfig fields that change the network, and the segjax MAE fields they become
NETWORK_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
                  "decoder_num_attention_heads", "decoder_hidden_size", "decoder_num_hidden_layers",
                  "decoder_intermediate_size", "mask_ratio", "norm_pix_loss")


def make_hf_config(directory, cfg: dict, seed: int = 0):
    """A seeded random ViTMAEForPreTraining of config `cfg`, saved with save_pretrained."""
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**cfg)).eval()
    randomize_(model, seed)
    grid = cfg["image_size"] // cfg["patch_size"]
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.copy_(
            torch.from_numpy(sincos_table(cfg["hidden_size"], grid))[None])
        model.decoder.decoder_pos_embed.copy_(
            torch.from_numpy(sincos_table(cfg["decoder_hidden_size"], grid))[None])
    model.save_pretrained(directory)
    return model


def segjax_fields(model) -> dict:
    """A segjax MAE's network, in ViTMAEConfig terms."""
    dec_ratio = model.decoder_mlp_ratio or model.mlp_ratio
    return dict(hidden_size=model.embed_dim, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
                intermediate_size=int(model.embed_dim * model.mlp_ratio), hidden_act=model.act,
                layer_norm_eps=model.ln_eps, image_size=model.img_size, patch_size=model.patch_size,
                num_channels=model.in_chans, qkv_bias=model.qkv_bias,
                decoder_num_attention_heads=model.decoder_num_heads, decoder_hidden_size=model.decoder_embed_dim,
                decoder_num_hidden_layers=model.decoder_depth,
                decoder_intermediate_size=int(model.decoder_embed_dim * dec_ratio),
                mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_config_fields_are_honoured(tmp_path, case):
    cfg = {**HF_BASE, **HF_CASES[case]}
    ref = make_hf_config(tmp_path / "hf", cfg, seed=len(case))
    want = {k: getattr(ref.config, k) for k in NETWORK_FIELDS}
    grid = cfg["image_size"] // cfg["patch_size"]
    images = photo_batch(cfg["image_size"])[..., :want["num_channels"]]
    noise = masking_noise(2, grid * grid, seed=3)
    ref_out = hf_forward(ref, images, noise)

    assert cli(["mae", str(tmp_path / "hf"), str(tmp_path / "sj")]) == 0
    ours, params, meta = run_mae(tmp_path / "sj", images, noise)
    compare_mae(f"hf {case}", ours, ref_out)
    # the meta names what was inferred: builder + overrides rebuild the same network
    model = models.build(meta["model"], **meta["model_kwargs"])
    assert segjax_fields(model) == want
    assert segjax_fields(models.build(meta["model"], **meta["overrides"])) == want
    builder = models.MODELS[meta["model"]]()
    assert set(meta["overrides"]) == {k for k, v in meta["model_kwargs"].items() if getattr(builder, k) != v}
    for words in (f"encoder width {want['hidden_size']}", f"MLP {want['intermediate_size']}",
                  f"decoder width {want['decoder_hidden_size']}", f"MLP {want['decoder_intermediate_size']}",
                  f"act {want['hidden_act']}", f"qkv bias {want['qkv_bias']}"):
        assert words in meta["architecture"], (words, meta["architecture"])

    # back to transformers: the config written reproduces the network; strict load, same outputs
    sd, extra = conv.to_state_dict(params, meta, "hf", hf_naming="v5")
    assert {k: extra["config"][k] for k in NETWORK_FIELDS} == want
    strict = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**extra["config"])).eval()
    strict.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    compare_mae(f"segjax->hf strict {case}", hf_forward(strict, images, noise), ref_out)
    assert cli(["mae", "--reverse", str(tmp_path / "sj"), str(tmp_path / "hf_back"), "--format", "hf"]) == 0
    back, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf_back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert {k: getattr(back.config, k) for k in NETWORK_FIELDS} == want

    # official {'model': sd}: the shapes carry widths, MLP widths and qkv bias; eps, act and
    # heads come back from the arguments. GELU-only: other activations are refused.
    if want["hidden_act"] != "gelu":
        with pytest.raises(ConversionError, match="GELU-only"):
            conv.export(tmp_path / "sj", tmp_path / "official.pth", "official")
        return
    conv.export(tmp_path / "sj", tmp_path / "official.pth", "official")
    conv.convert(tmp_path / "official.pth", tmp_path / "sj2", num_heads=want["num_attention_heads"],
                 decoder_num_heads=want["decoder_num_attention_heads"], ln_eps=want["layer_norm_eps"],
                 norm_pix_loss=want["norm_pix_loss"])
    again, meta2 = load_params(tmp_path / "sj2")
    fields2 = segjax_fields(models.build(meta2["model"], **meta2["model_kwargs"]))
    assert {k: v for k, v in fields2.items() if k != "mask_ratio"} == {k: v for k, v in want.items()
                                                                      if k != "mask_ratio"}
    fa, fb = flatten_paths(params), flatten_paths(again)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_hf_registry_variant_is_named_exactly(tmp_path):
    """A config equal to a registry variant is recorded as that name with no overrides."""
    tiny = models.MODELS["mae_vit_tiny"]()
    cfg = dict(hidden_size=tiny.embed_dim, num_hidden_layers=tiny.depth, num_attention_heads=tiny.num_heads,
               intermediate_size=4 * tiny.embed_dim, image_size=tiny.img_size, patch_size=tiny.patch_size,
               decoder_hidden_size=tiny.decoder_embed_dim, decoder_num_hidden_layers=tiny.decoder_depth,
               decoder_num_attention_heads=tiny.decoder_num_heads,
               decoder_intermediate_size=4 * tiny.decoder_embed_dim, layer_norm_eps=1e-6)
    make_hf_config(tmp_path / "hf", cfg)
    meta, _ = conv.convert(tmp_path / "hf", tmp_path / "sj")
    assert meta["model"] == "mae_vit_tiny" and meta["overrides"] == {}
    assert load_params(tmp_path / "sj")[1]["overrides"] == {}


def test_registry_name_is_the_nearest_builder_with_overrides():
    b16 = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
               ln_eps=1e-6, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=False)
    assert conv.registry_name("mae", b16) == ("mae_vit_b16", {})
    assert conv.registry_name("mae", {**b16, "decoder_embed_dim": 256, "decoder_mlp_ratio": 2.0}) == (
        "mae_vit_b16", {"decoder_embed_dim": 256, "decoder_mlp_ratio": 2.0})
    name, over = conv.registry_name("mae", {**b16, "embed_dim": 96, "depth": 2, "num_heads": 3}, variant="b16")
    assert name == "mae_vit_b16" and over == {"embed_dim": 96, "depth": 2, "num_heads": 3}
    with pytest.raises(ConversionError, match="not a registered"):
        conv.registry_name("mae", b16, variant="b17")


def test_error_names_the_inferred_architecture():
    """A failing conversion describes the model it inferred (not a registry name's sizes)."""
    ref = OfficialMAE(32, 4, 3, 64, 2, 4, 48, 2, 4, mlp_ratio=2.0)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd["decoder_blocks.1.mlp.fc1.weight"] = np.zeros((64, 48), np.float32)  # block 0 has 96
    with pytest.raises(ConversionError) as e:
        conv.from_state_dict(sd, num_heads=4, decoder_num_heads=4)
    msg = str(e.value)
    assert "encoder width 64" in msg and "MLP 128" in msg and "decoder width 48" in msg and "MLP 96" in msg
    assert "decoder_blocks_1/mlp/fc1/kernel" in msg and "mae_vit_b16" not in msg


def test_official_mlp_ratio_parity(tmp_path, images, noise):
    ref = OfficialMAE(32, 4, 3, 64, 2, 4, 32, 1, 4, mlp_ratio=3.0).eval()
    randomize_(ref, 7)
    torch.save({"model": ref.state_dict()}, tmp_path / "mae.pth")
    meta, _ = conv.convert(tmp_path / "mae.pth", tmp_path / "sj", num_heads=4, decoder_num_heads=4)
    assert meta["model_kwargs"]["mlp_ratio"] == 3.0 and "decoder_mlp_ratio" not in meta["model_kwargs"]
    with torch.no_grad():
        loss, pred, mask = ref(nchw(images), torch.from_numpy(noise))
    ours, params, meta = run_mae(tmp_path / "sj", images, noise)
    compare_mae("official mlp_ratio 3", ours, {"loss": loss.numpy(), "pred": pred.numpy(), "mask": mask.numpy()})
    sd, _ = conv.to_state_dict(params, meta, "official")
    OfficialMAE(32, 4, 3, 64, 2, 4, 32, 1, 4, mlp_ratio=3.0).load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("cls", [False, True])
def test_timm_mlp_ratio_qkv_bias_act(tmp_path, images, noise, cls):
    """timm ViTs with mlp_ratio != 4, no qkv bias and (given by --act) another activation."""
    act = "silu" if cls else "quick_gelu"
    ref = tiny_timm(11, mlp_ratio=2.5, qkv_bias=False, act_layer=conv._TIMM_ACT[act],
                    **(dict(num_classes=7, global_pool="avg") if cls else dict(num_classes=0, global_pool="token")))
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    argv = ["mae", str(tmp_path / "vit.pth"), str(tmp_path / "sj"), "--num-heads", str(TINY["heads"])]
    assert cli(argv + ["--act", act]) == 0
    params, meta = load_params(tmp_path / "sj")
    kw = meta["model_kwargs"]
    assert kw["mlp_ratio"] == 2.5 and kw["qkv_bias"] is False and meta["overrides"]["qkv_bias"] is False
    assert kw.get("act", "gelu") == act and "MLP 160" in meta["architecture"]
    model = models.build(meta["model"], **kw)
    if cls:
        assert meta["params"] == "vit_classifier"
        with torch.no_grad():
            ref_out = ref(nchw(images)).numpy()
        assert_close(f"timm classifier (mlp 2.5, no qkv bias, {act})", classifier_logits(tmp_path / "sj", images),
                     ref_out)
    else:
        assert meta["params"] == "mae_encoder"
        init = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], noise=noise[:1])))
        full, _ = merge_params(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init["params"]), params,
                               allow_missing=[r"^decoder_", r"^mask_token$"])
        latent, _, _ = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n, 0.75, method="forward_encoder"))(
            full, images, noise)
        with torch.no_grad():
            ref_out, _, _ = mae_forward_encoder(ref, nchw(images), torch.from_numpy(noise), 0.75)
            ref_out = ref_out.numpy()
        assert_close(f"timm encoder latent (mlp 2.5, no qkv bias, {act})", latent, ref_out)
    # back to timm: the kwargs rebuild the network (strict), same outputs
    sd, extra = conv.to_state_dict(params, meta, "timm")
    assert extra["timm_kwargs"]["qkv_bias"] is False and extra["timm_kwargs"]["mlp_ratio"] == 2.5
    back = TimmViT(**extra["timm_kwargs"]).eval()
    back.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        out = back(nchw(images)).numpy() if cls else mae_forward_encoder(
            back, nchw(images), torch.from_numpy(noise), 0.75)[0].numpy()
    assert_close("segjax->timm", out, ref_out)


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    from segjax.models.vit import ACTIVATIONS

    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        ours = np.asarray(jax.jit(fn)(x))
        err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1.0)
        assert err <= 2e-6, (name, err)


@pytest.mark.parametrize("edit, match", [
    (dict(hidden_act="prelu"), r"activation 'prelu'.*not supported"),
    (dict(hidden_act="no_such_act"), r"activation 'no_such_act'.*not supported"),
    (dict(image_size=[32, 48]), r"non-square image"),
    (dict(intermediate_size=200), r"intermediate_size=200 but the weights imply 256"),
    (dict(qkv_bias=False), r"qkv_bias=False but the weights imply True"),
    (dict(decoder_intermediate_size=64), r"decoder_intermediate_size=64 but the weights imply 128"),
])
def test_hf_config_contradictions_are_clear_errors(tmp_path, capsys, edit, match):
    make_hf_config(tmp_path / "hf", HF_BASE)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **edit}))
    capsys.readouterr()
    assert cli(["mae", str(tmp_path / "hf"), str(tmp_path / "sj")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "sj").exists()


# ----------------------------------------------------------------------------- errors


def test_wrong_family_is_rejected(tmp_path):
    resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "bn1.weight": np.ones(64, np.float32),
              "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32),
              "fc.weight": np.zeros((1000, 2048), np.float32)}
    with pytest.raises(ConversionError, match="ResNet"):
        conv.from_state_dict(resnet)
    sam = {"image_encoder.patch_embed.proj.weight": np.zeros((8, 3, 16, 16), np.float32),
           "image_encoder.blocks.0.attn.qkv.weight": np.zeros((24, 8), np.float32),
           "image_encoder.blocks.0.attn.rel_pos_h": np.zeros((27, 4), np.float32),
           "mask_decoder.iou_token.weight": np.zeros((1, 8), np.float32)}
    with pytest.raises(ConversionError, match="Segment Anything"):
        conv.from_state_dict(sam)
    common.write_state_dict(resnet, tmp_path / "r50.safetensors")
    assert cli(["mae", str(tmp_path / "r50.safetensors"), str(tmp_path / "out")]) == 2


def test_missing_and_unmapped_keys_are_reported():
    ref = OfficialMAE(32, 4, 3, 64, 2, 4, 32, 1, 4)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    cut = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"missing[\s\S]*blocks_1/mlp/fc2/bias"):
        conv.from_state_dict(cut, num_heads=4, decoder_num_heads=4)
    extra = {**sd, "blocks.0.ls1.gamma": np.ones(64, np.float32)}
    with pytest.raises(ConversionError, match=r"unmapped[\s\S]*blocks\.0\.ls1\.gamma"):
        conv.from_state_dict(extra, num_heads=4, decoder_num_heads=4)
    _, _, report = conv.from_state_dict(extra, num_heads=4, decoder_num_heads=4, ignore=[r"\.ls1\."])
    assert report.ignored == ["blocks.0.ls1.gamma"]
    wrong = {**sd, "decoder_pred.weight": np.zeros((10, 32), np.float32)}
    with pytest.raises(ConversionError, match="decoder_pred/kernel"):
        conv.from_state_dict(wrong, num_heads=4, decoder_num_heads=4)


def test_head_count_inference_is_reported():
    ref = OfficialMAE(32, 4, 3, 64, 1, 4, 32, 1, 4)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    _, meta, report = conv.from_state_dict(sd)
    assert meta["source"]["num_heads_from"] == "head_dim 64 rule"
    assert any("encoder heads not given" in n for n in report.notes)


def test_rules_round_trip_layouts():
    rules = (common.Rule(("a.weight",), "a/kernel", "linear"),
             common.Rule(("c.weight",), "c/kernel", "conv"),
             common.Rule(("q.weight",), "f/kernel", "linear", (0, 2)),
             common.Rule(("k.weight",), "f/kernel", "linear", (1, 2)))
    rng = np.random.default_rng(0)
    sd = {"a.weight": rng.random((3, 5)), "c.weight": rng.random((4, 3, 2, 2)),
          "q.weight": rng.random((6, 5)), "k.weight": rng.random((6, 5))}
    flat, report = common.rename(sd, rules)
    assert report.ok and flat["c/kernel"].shape == (2, 2, 3, 4) and flat["f/kernel"].shape == (5, 12)
    np.testing.assert_array_equal(flat["f/kernel"][:, 6:], sd["k.weight"].T)
    back = common.unrename(flat, rules)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)


# ----------------------------------------------------------------------------- full size


@pytest.mark.slow
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_b16_parity(tmp_path, norm_pix_loss):
    b16 = dict(img=224, patch=16, dim=768, depth=12, heads=12, dec_dim=512, dec_depth=8, dec_heads=16)
    ref_model = make_hf(tmp_path / "hf", b16, norm_pix_loss)
    conv.convert(tmp_path / "hf", tmp_path / "sj")
    images, noise = photo_batch(224, ("astronaut",)), masking_noise(1, 196)
    ours, _, meta = run_mae(tmp_path / "sj", images, noise)
    assert meta["model"] == "mae_vit_b16"
    compare_mae(f"hf b16 norm_pix={norm_pix_loss}", ours, hf_forward(ref_model, images, noise))


@pytest.mark.slow
def test_official_b16_full_parity(tmp_path):
    ref = OfficialMAE(224, 16, 3, 768, 12, 12, 512, 8, 16, norm_pix_loss=True).eval()
    randomize_(ref, 5)
    torch.save({"model": ref.state_dict()}, tmp_path / "mae_pretrain_vit_base_full.pth")
    meta, _ = conv.convert(tmp_path / "mae_pretrain_vit_base_full.pth", tmp_path / "sj")
    assert meta["model"] == "mae_vit_b16" and meta["source"]["num_heads_from"].startswith("standard")
    images, noise = photo_batch(224, ("astronaut",)), masking_noise(1, 196)
    with torch.no_grad():
        loss, pred, mask = ref(nchw(images), torch.from_numpy(noise))
    ours, _, _ = run_mae(tmp_path / "sj", images, noise)
    compare_mae("official b16 _full", ours, {"loss": loss.numpy(), "pred": pred.numpy(), "mask": mask.numpy()})
