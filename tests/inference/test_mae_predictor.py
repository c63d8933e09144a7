"""MAEPredictor on a converted checkpoint: model outputs, reconstructions, the PNG grid."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from segjax import models
from segjax.checkpoint import save_params
from segjax.convert import common
from segjax.convert import mae as conv
from segjax.inference import MAEPredictor
from segjax.models.mae import patchify
from segjax.testing.images import masking_noise, photo_batch
from segjax.testing.params import abstract_params, random_params

KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
          decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(scope="module", params=[False, True], ids=["pixels", "norm_pix"])
def converted(request, tmp_path_factory):
    """A random tiny MAE written as a Hugging Face checkpoint, then converted (torch-free)."""
    d = tmp_path_factory.mktemp("mae_pred")
    model = models.build("mae_vit_tiny", **KW, norm_pix_loss=request.param)
    x = np.zeros((1, 32, 32, 3), np.float32)
    params = random_params(abstract_params(model, x, noise=np.zeros((1, 64), np.float32)), seed=7)
    meta = {"model": "mae_vit_tiny", "model_kwargs": {**KW, "norm_pix_loss": request.param},
            "params": "mae", "has_decoder": True}
    sd, extra = conv.to_state_dict(params, meta, "hf")
    (d / "hf").mkdir()
    common.write_state_dict(sd, d / "hf" / "model.safetensors")
    (d / "hf" / "config.json").write_text(json.dumps(extra["config"]))
    conv.convert(d / "hf", d / "sj")
    return d, model, params, MAEPredictor.from_checkpoint(d / "sj")


def test_outputs_match_the_model(converted):
    _, model, params, predictor = converted
    images, noise = photo_batch(32), masking_noise(2, 64)
    out = predictor(images, noise=noise)
    assert set(out) == {"loss", "pred", "mask"} and out["pred"].shape == (2, 64, 48)
    assert out["mask"].sum(1).tolist() == [48, 48]  # 75% of 64 removed
    # the loss as the reference defines it, recomputed in numpy from pred and mask
    target = np.asarray(patchify(images, 4))
    if model.norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    loss = (((out["pred"] - target) ** 2).mean(-1) * out["mask"]).sum() / out["mask"].sum()
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    if model.norm_pix_loss:
        return  # one compile of the plain model is enough (the forward is the same)
    ref = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(params, images, noise)
    np.testing.assert_allclose(out["pred"], np.asarray(ref["pred"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["loss"], np.asarray(ref["loss"]), rtol=1e-6)
    np.testing.assert_array_equal(out["mask"], np.asarray(ref["mask"]))
    # noise drawn from rng, another mask ratio
    drawn = predictor(images, rng=jax.random.key(3), mask_ratio=0.5)
    assert drawn["mask"].sum(1).tolist() == [32, 32]


def test_reconstruct(converted, tmp_path):
    _, model, _, predictor = converted
    images, noise = photo_batch(32), masking_noise(2, 64, seed=1)
    out = predictor.reconstruct(images, noise=noise)
    for k in ("reconstruction", "masked", "paste", "mask_pixels"):
        assert out[k].shape == (2, 32, 32, 3), k
    removed = out["mask_pixels"] > 0.5
    np.testing.assert_array_equal(out["paste"][~removed], images[~removed])
    np.testing.assert_array_equal(out["masked"][removed], 0.0)
    np.testing.assert_allclose(out["paste"][removed], out["reconstruction"][removed])
    pred_px = patchify(out["reconstruction"], 4)  # (B, L, 48)
    if model.norm_pix_loss:  # de-normalised with the input patch's mean / unbiased std
        target = patchify(images, 4)
        mean, std = target.mean(-1, keepdims=True), np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(pred_px, out["pred"] * std + mean, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(pred_px, out["pred"], rtol=1e-6)
    png = predictor.save_png(tmp_path / "grid.png", images, out)
    from PIL import Image

    assert Image.open(png).size == (4 * 32 + 3 * 2, 2 * 32 + 2)  # 2px gaps between tiles


def test_encoder_only_checkpoint_is_refused(tmp_path):
    model = models.build("mae_vit_tiny", **KW)
    params = random_params(abstract_params(model, np.zeros((1, 32, 32, 3), np.float32),
                                           noise=np.zeros((1, 64), np.float32)), seed=0)
    enc = {k: v for k, v in params.items() if not k.startswith(("decoder_", "mask_token"))}
    save_params(tmp_path / "enc", enc, {"model": "mae_vit_tiny", "model_kwargs": KW,
                                        "params": "mae_encoder", "has_decoder": False})
    with pytest.raises(ValueError, match="without the MAE decoder"):
        MAEPredictor.from_checkpoint(tmp_path / "enc")


@pytest.fixture(scope="module")
def tiny_predictor():
    model = models.build("mae_vit_tiny", **KW)
    params = random_params(abstract_params(model, np.zeros((1, 32, 32, 3), np.float32),
                                           noise=np.zeros((1, 64), np.float32)), seed=0)
    return MAEPredictor(model, params)


_IMAGES = photo_batch(32)
# Each raised a broadcasting TypeError deep in the model or returned NaN before.
BAD_CALLS = {
    "smaller_image": (dict(images=_IMAGES[:, :16, :16]), "must be 32x32"),
    "larger_image": (dict(images=np.zeros((1, 64, 64, 3), np.float32)), "must be 32x32"),
    "non_square": (dict(images=np.zeros((1, 32, 48, 3), np.float32)), "must be 32x32.*got 32x48"),
    "indivisible": (dict(images=np.zeros((1, 30, 30, 3), np.float32)), "must be 32x32"),
    "empty_batch": (dict(images=np.zeros((0, 32, 32, 3), np.float32)), "empty batch"),
    "three_d": (dict(images=_IMAGES[0]), r"\(B, H, W, 3\)"),
    "five_d": (dict(images=_IMAGES[None]), r"\(B, H, W, 3\)"),
    "one_channel": (dict(images=_IMAGES[..., :1]), "3 channels"),
    "four_channels": (dict(images=np.zeros((1, 32, 32, 4), np.float32)), "3 channels"),
    "channels_first": (dict(images=_IMAGES.transpose(0, 3, 1, 2)), "3 channels"),
    "strings": (dict(images=np.full((1, 32, 32, 3), "a")), "real numbers"),
    "nan_pixel": (dict(images=np.where(np.arange(32)[None, :, None, None] == 3, np.nan, _IMAGES)), "non-finite"),
    "ratio_one": (dict(images=_IMAGES, mask_ratio=1.0), r"\[0, 1\)"),
    "ratio_above_one": (dict(images=_IMAGES, mask_ratio=1.5), r"\[0, 1\)"),
    "ratio_negative": (dict(images=_IMAGES, mask_ratio=-0.1), r"\[0, 1\)"),
    "ratio_nan": (dict(images=_IMAGES, mask_ratio=float("nan")), r"\[0, 1\)"),
    "ratio_inf": (dict(images=_IMAGES, mask_ratio=float("inf")), r"\[0, 1\)"),
    "ratio_text": (dict(images=_IMAGES, mask_ratio="most"), r"\[0, 1\)"),
    "ratio_keeps_nothing": (dict(images=_IMAGES, mask_ratio=0.99), "keeps no patch"),
    "noise_shape": (dict(images=_IMAGES, noise=np.zeros((2, 16), np.float32)), r"noise must be \(B, L\)"),
    "noise_nan": (dict(images=_IMAGES, noise=np.full((2, 64), np.nan, np.float32)), "non-finite"),
}


@pytest.mark.parametrize("method", ["__call__", "reconstruct"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_are_named(tiny_predictor, case, method):
    kwargs, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        getattr(tiny_predictor, method)(**kwargs)


def test_edge_mask_ratios(tiny_predictor):
    """0 removes nothing (outputs finite; the loss, a mean over removed patches, is NaN
    as the reference's); the largest ratio that keeps one patch works."""
    out = tiny_predictor.reconstruct(_IMAGES, mask_ratio=0.0)
    assert out["mask"].sum() == 0 and np.isfinite(out["pred"]).all() and np.isnan(out["loss"])
    np.testing.assert_array_equal(out["paste"], _IMAGES)
    out = tiny_predictor(_IMAGES, mask_ratio=0.98)  # int(64 * 0.02) = 1 visible patch
    assert out["mask"].sum(1).tolist() == [63, 63] and np.isfinite(out["loss"])
