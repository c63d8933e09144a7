"""SAM converter and model parity against the official `segment_anything` (and HF SamModel).

fp32 parity is max |ours - reference| / max |reference| per output (REL_TOL); binary
low-res masks must agree to IoU >= 0.99. Tiny models by default, ViT-B under `slow`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from segjax.testing import importorskip

torch = importorskip("torch")
importorskip("segment_anything")

from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from segjax import models
from segjax.checkpoint import load_params
from segjax.convert import ConversionError
from segjax.convert import sam as conv
from segjax.convert.__main__ import main as cli
from segjax.models.sam import ABSENT
from segjax.testing.images import chelsea as photo  # (300, 451, 3): not square, so padding matters
from segjax.testing.sam_official import TINY, VIT_B, converted, make_official, prompt_cases, to_tokens

REL_TOL = 1e-5
torch.set_num_threads(1)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_close(name, ours, ref, tol=REL_TOL):
    err = rel_err(ours, ref)
    print(f"{name}: rel err {err:.2e}")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
    return err


def mask_iou(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


class Ours:
    """segjax model from a checkpoint dir, with jitted entry points."""

    def __init__(self, ckpt_dir):
        params, self.meta = load_params(ckpt_dir)
        self.model = models.build(self.meta["model"], **self.meta["model_kwargs"])
        self.params = {"params": params}
        m = self.model
        self.embed = jax.jit(lambda p, x, hw: m.apply(p, x, hw, method=m.embed_image))
        self.predict = jax.jit(
            lambda p, e, c, lab, mi, hm, mm: m.apply(p, e, c, lab, mi, hm, mm, method=m.predict_masks),
            static_argnums=6)

    def embed_image(self, resized: np.ndarray):
        s = self.model.img_size
        x = np.zeros((1, s, s, 3), np.float32)
        x[0, :resized.shape[0], :resized.shape[1]] = resized
        return self.embed(self.params, x, np.array([resized.shape[:2]], np.int32))


def pack(tokens: list[tuple[np.ndarray, np.ndarray]], t_max: int):
    """Prompts of different lengths -> (1, P, t_max, 2), (1, P, t_max) padded with ABSENT."""
    coords = np.zeros((1, len(tokens), t_max, 2), np.float32)
    labels = np.full((1, len(tokens), t_max), ABSENT, np.int32)
    for i, (c, lab) in enumerate(tokens):
        coords[0, i, :len(lab)], labels[0, i, :len(lab)] = c, lab
    return coords, labels


def check_parity(official, ours: Ours, tol=REL_TOL, t_max=8):
    """Image embeddings, low-res logits and IoU for every prompt case, multimask on and
    off, and a mask input from a previous call; all prompts padded into one batch."""
    image = photo()
    pred = SamPredictor(official)
    pred.set_image(image)
    resized = pred.transform.apply_image(image)
    emb = ours.embed_image(resized)
    errs = {"embeddings": assert_close("image embeddings", emb, pred.features.permute(0, 2, 3, 1).numpy(), tol)}
    cases = prompt_cases(*image.shape[:2])
    ref_low = {}
    for mm in (True, False):
        names, tokens, refs = [], [], []
        for name, case in cases.items():
            masks, iou, low = pred.predict(**case, multimask_output=mm, return_logits=True)
            names.append(name), tokens.append(to_tokens(case, pred.transform, pred.original_size))
            refs.append((low, iou))
            ref_low[name, mm] = low
        # a mask input from the previous (multimask) call, with the best mask
        if not mm:
            prev = ref_low["one_point", True]
            case = dict(cases["one_point"], mask_input=prev[None, 0])
            masks, iou, low = pred.predict(**case, multimask_output=mm, return_logits=True)
            names.append("mask_input"), tokens.append(to_tokens(case, pred.transform, pred.original_size))
            refs.append((low, iou))
        coords, labels = pack(tokens, t_max)
        h = emb.shape[1]
        mask_input = np.zeros((1, len(names), 4 * h, 4 * h, 1), np.float32)
        has_mask = np.zeros((1, len(names)), bool)
        if "mask_input" in names:
            k = names.index("mask_input")
            mask_input[0, k, ..., 0], has_mask[0, k] = ref_low["one_point", True][0], True
        if not has_mask.any():  # the shared-image path (no dense prompt) when no prompt has a mask
            mask_input = has_mask = None
        out = ours.predict(ours.params, emb, coords, labels, mask_input, has_mask, mm)
        for k, (name, (low, iou)) in enumerate(zip(names, refs)):
            tag = f"{name} multimask={mm}"
            errs[f"{tag} logits"] = assert_close(f"{tag} low-res logits", out["low_res_logits"][0, k], low, tol)
            errs[f"{tag} iou"] = assert_close(f"{tag} iou", out["iou_predictions"][0, k], iou, tol)
            assert mask_iou(out["low_res_logits"][0, k], low) >= 0.99, tag
    return errs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam_tiny")
    official, _ = converted(d, TINY, seed=0)  # d / "sam.pth" -> d / "ckpt"
    return official, d


def test_tiny_parity_official(tiny, capsys):
    official, d = tiny
    ours = Ours(d / "ckpt")
    assert ours.meta["model"] == "sam_vit_tiny"
    kw = ours.meta["model_kwargs"]
    assert kw["encoder_global_attn_indexes"] == [1, 3] and kw["window_size"] == 4
    assert kw["encoder_num_heads"] == 2 and kw["prompt_embed_dim"] == 32 and kw["img_size"] == 256
    with capsys.disabled():
        errs = check_parity(official, ours)
        print(f"\nSAM tiny parity: worst rel err {max(errs.values()):.2e} over {len(errs)} outputs")


def test_reverse_export_loads_strict_and_roundtrips(tiny):
    official, d = tiny
    assert cli(["sam", "--reverse", str(d / "ckpt"), str(d / "back.pth")]) == 0
    sd = torch.load(d / "back.pth", map_location="cpu", weights_only=True)
    fresh = make_official(TINY, seed=1)
    fresh.load_state_dict(sd, strict=True)
    ref = official.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k  # layout transforms are exact permutations
    image = torch.from_numpy(photo()[:256, :256].copy()).permute(2, 0, 1).float()[None]
    with torch.no_grad():
        assert torch.equal(fresh.image_encoder(fresh.preprocess(image[0])[None]),
                           official.image_encoder(official.preprocess(image[0])[None]))


def test_variant_asserts(tiny, tmp_path):
    _, d = tiny
    assert cli(["sam", str(d / "sam.pth"), str(tmp_path / "a"), "--variant", "sam_vit_tiny"]) == 0
    with pytest.raises(ConversionError, match="not sam_vit_b"):
        conv.convert(d / "sam.pth", tmp_path / "b", variant="sam_vit_b")
    assert cli(["sam", str(d / "sam.pth"), str(tmp_path / "c"), "--variant", "vit_b"]) == 2


def test_wrong_family_and_shapes(tiny):
    official, _ = tiny
    sd = {k: v.numpy() for k, v in official.state_dict().items()}
    mae_like = {"patch_embed.proj.weight": np.zeros((8, 3, 4, 4)), "blocks.0.attn.qkv.weight": np.zeros((24, 8))}
    with pytest.raises(ConversionError, match="MAE"):
        conv.from_state_dict(mae_like)
    resnet_like = {"conv1.weight": np.zeros((8, 3, 7, 7)), "layer1.0.conv1.weight": np.zeros((8, 8, 3, 3))}
    with pytest.raises(ConversionError, match="ResNet"):
        conv.from_state_dict(resnet_like)
    bad = dict(sd)
    bad["mask_decoder.output_upscaling.0.weight"] = np.zeros((32, 4, 2, 2), np.float32)  # 8 -> 4 outputs
    with pytest.raises(ConversionError, match="output_upscaling_0"):
        conv.from_state_dict(bad)
    extra = dict(sd, **{"mask_decoder.extra_head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match="extra_head"):
        conv.from_state_dict(extra)
    params, meta, report = conv.from_state_dict(extra, ignore=[r"extra_head"])
    assert report.ignored == ["mask_decoder.extra_head.weight"]
    missing = {k: v for k, v in sd.items() if k != "prompt_encoder.no_mask_embed.weight"}
    with pytest.raises(ConversionError, match="no_mask_embed"):
        conv.from_state_dict(missing)
    uneven = dict(sd)
    uneven["image_encoder.blocks.0.attn.rel_pos_h"] = np.zeros((9, 32), np.float32)
    with pytest.raises(ConversionError, match="block 0"):
        conv.from_state_dict(uneven)


def test_every_source_key_used(tiny):
    official, _ = tiny
    sd = {k: v.numpy() for k, v in official.state_dict().items()}
    _, _, report = conv.from_state_dict(sd)
    assert sorted(report.used) == sorted(sd) and not report.ignored and report.ok


def test_non_standard_variant_is_inferred():
    """Width, depth, heads, global blocks, window, patch, size and decoder dims come from
    the tensors: an odd SAM converts with nothing but the state dict, and runs."""
    cfg = dict(TINY, img=192, patch=8, dim=48, depth=3, heads=3, global_idx=(0,), window=6, c=16,
               dec_mlp=24, iou_hidden=20, mask_in=8)
    official = make_official(cfg, seed=2)
    sd = {k: v.numpy() for k, v in official.state_dict().items()}
    params, meta, report = conv.from_state_dict(sd)
    kw = meta["model_kwargs"]
    assert (kw["img_size"], kw["patch_size"], kw["encoder_embed_dim"], kw["encoder_depth"]) == (192, 8, 48, 3)
    assert (kw["encoder_num_heads"], kw["encoder_global_attn_indexes"], kw["window_size"]) == (3, [0], 6)
    assert (kw["prompt_embed_dim"], kw["decoder_mlp_dim"], kw["iou_head_hidden_dim"], kw["mask_in_chans"]) == (
        16, 24, 20, 8)
    model = models.build(meta["model"], **kw)
    x = np.random.default_rng(0).uniform(0, 255, (1, 192, 192, 3)).astype(np.float32)
    emb = model.apply({"params": params}, x, np.array([[192, 192]]), method=model.embed_image)
    with torch.no_grad():
        ref = official.image_encoder(official.preprocess(torch.from_numpy(x[0]).permute(2, 0, 1))[None])
    assert_close("odd variant embeddings", emb, ref.permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------- Hugging Face


def hf_tiny(seed=0):
    transformers = importorskip("transformers")
    from segjax.testing.sam_official import randomize_

    c = TINY["c"]
    cfg = transformers.SamConfig(
        vision_config=dict(hidden_size=TINY["dim"], num_hidden_layers=TINY["depth"],
                           num_attention_heads=TINY["heads"], image_size=TINY["img"], patch_size=TINY["patch"],
                           output_channels=c, window_size=TINY["window"],
                           global_attn_indexes=list(TINY["global_idx"]), mlp_dim=4 * TINY["dim"],
                           num_pos_feats=c // 2),
        prompt_encoder_config=dict(hidden_size=c, image_size=TINY["img"], patch_size=TINY["patch"],
                                   mask_input_channels=TINY["mask_in"]),
        mask_decoder_config=dict(hidden_size=c, mlp_dim=TINY["dec_mlp"], num_attention_heads=TINY["dec_heads"],
                                 iou_head_hidden_dim=TINY["iou_hidden"]))
    torch.manual_seed(seed)
    return randomize_(transformers.SamModel(cfg).eval(), seed)


def test_hf_conversion_parity(tmp_path):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["sam", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    ours = Ours(tmp_path / "ckpt")
    assert ours.meta["model_kwargs"]["decoder_ln_eps"] == pytest.approx(1e-6)
    image = photo()
    resized = ResizeLongestSide(TINY["img"]).apply_image(image)
    emb = ours.embed_image(resized)
    x = np.zeros((1, 256, 256, 3), np.float32)
    x[0, :resized.shape[0], :resized.shape[1]] = resized
    x = (x - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    x[0, resized.shape[0]:] = 0
    with torch.no_grad():
        ref_emb = hf.get_image_embeddings(torch.from_numpy(x).permute(0, 3, 1, 2).float())
    assert_close("hf image embeddings", emb, ref_emb.permute(0, 2, 3, 1).numpy())
    pts = np.array([[[[60.0, 70.0], [120.0, 40.0], [0.0, 0.0]]]], np.float32)  # (B, P, T, 2)
    lab = np.array([[[1, 0, -1]]], np.int32)
    for mm in (True, False):
        with torch.no_grad():
            ref = hf(image_embeddings=ref_emb, input_points=torch.from_numpy(pts[:, :, :2]),
                     input_labels=torch.from_numpy(lab[:, :, :2]), multimask_output=mm)
        out = ours.predict(ours.params, emb, pts, lab, None, None, mm)
        assert_close(f"hf logits multimask={mm}", out["low_res_logits"], ref.pred_masks.numpy())
        assert_close(f"hf iou multimask={mm}", out["iou_predictions"], ref.iou_scores.numpy())


def test_hf_reverse_export_loads_strict(tiny, tmp_path):
    transformers = importorskip("transformers")
    _, d = tiny
    assert cli(["sam", "--reverse", str(d / "ckpt"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.SamModel.from_pretrained(tmp_path / "hf")
    params, meta = load_params(d / "ckpt")
    sd, _ = conv.to_state_dict(params, meta, "hf")
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


# ----------------------------------------------------------------------------- ViT-B


@pytest.mark.slow
def test_vit_b_full_size_parity(tmp_path, capsys):
    official = make_official(VIT_B, seed=0)
    torch.save(official.state_dict(), tmp_path / "sam_vit_b.pth")
    assert cli(["sam", str(tmp_path / "sam_vit_b.pth"), str(tmp_path / "ckpt"), "--variant", "sam_vit_b"]) == 0
    ours = Ours(tmp_path / "ckpt")
    assert ours.meta["model"] == "sam_vit_b"
    with capsys.disabled():
        errs = check_parity(official, ours)  # measured 2.0e-6 worst (CPU, fp32)
        print(f"\nSAM ViT-B parity: worst rel err {max(errs.values()):.2e}")
