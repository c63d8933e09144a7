"""Mask R-CNN converter and eval-mode parity against torchvision (seeded random weights).

A seeded torchvision MaskRCNN (`segjax/testing/maskrcnn_ref.py`: the `mask_rcnn_tiny`
twin by default, maskrcnn_resnet50_fpn under `slow`) goes through
`python -m segjax.convert maskrcnn`; then, on a real photo (skimage chelsea, 300x451):
  * input transform (resize + normalise + pad): rel err <= 1e-5
  * backbone/FPN features (same input tensor): rel err <= REL_TOL
  * RPN proposals: the same count and order, boxes within 1e-5 * image scale (R50, whose
    random weights leave many near-tied scores: the same set up to 1%, order aside)
  * box head class logits / box deltas on torchvision's proposals: rel err <= REL_TOL
  * mask logits on torchvision's detections: rel err <= REL_TOL
  * final detections (MaskRCNNPredictor vs model([img])): same count and labels (R50:
    >= 95% matched), boxes within 1e-2 px, scores within 1e-4, pasted mask probabilities
    within 1e-3
rel err = max |ours - ref| / max |ref|, fp32.
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
from segjax.checkpoint import load_params  # noqa: E402
from segjax.convert import ConversionError  # noqa: E402
from segjax.convert import maskrcnn as conv  # noqa: E402
from segjax.convert.__main__ import main as cli  # noqa: E402
from segjax.inference import MaskRCNNPredictor  # noqa: E402
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN, prepare_image  # noqa: E402
from segjax.testing.maskrcnn_ref import chelsea, r50_torch, tiny_torch, to_tensor  # noqa: E402

REL_TOL = 1e-4
torch.set_num_threads(1)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_close(name, ours, ref, tol=REL_TOL) -> float:
    err = rel_err(ours, ref)
    print(f"{name}: rel err {err:.2e}")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
    return err


def save_torch(model, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def convert_cli(tmp_path, model, *extra) -> tuple[MaskRCNN, dict, dict]:
    src = save_torch(model, tmp_path / "tv.pth")
    assert cli(["maskrcnn", src, str(tmp_path / "sj"), *extra]) == 0
    params, meta = load_params(tmp_path / "sj")
    return models.build(meta["model"], **meta["model_kwargs"]), params, meta


def nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def run_parity(tmp_path, tv, extra=(), name="tiny", exact=True):
    """Every stage of the eval forward, ours vs torchvision. Returns the errors.

    exact=False (R50 with random weights: many near-tied scores): proposals and
    detections are compared as sets (>= 99% / 95% matched), the rest stays exact."""
    model, params, meta = convert_cli(tmp_path, tv, *extra)
    img = chelsea()
    errs = {}
    v = {"params": params}
    apply = jax.jit(model.apply, static_argnames=("method",))

    with torch.no_grad():
        il, _ = tv.transform([to_tensor(img)])
        ref_x = il.tensors
        (rh, rw), = il.image_sizes
        padded, rhw = prepare_image(img, model.min_size, model.max_size, model.size_divisible)
        assert rhw == (rh, rw) and padded.shape[:2] == tuple(ref_x.shape[-2:])
        image, hw = jnp.asarray(padded[None]), jnp.asarray([rhw], jnp.int32)
        ours_x = model.apply(v, image, hw, method=MaskRCNN.normalize)
        errs["transform"] = assert_close(f"{name} transform", ours_x, nhwc(ref_x), 1e-5)

        ref_feats = tv.backbone(ref_x)
        feats = apply(v, jnp.asarray(nhwc(ref_x)), method=MaskRCNN.features_normalized)
        for i, (k, f) in enumerate(ref_feats.items()):
            errs[f"fpn_{k}"] = assert_close(f"{name} fpn {k}", feats[i], nhwc(f))

        # RPN proposals (eval top-n); same features as input
        ref_props, _ = tv.rpn(il, ref_feats)
        ref_props = ref_props[0].numpy()
        input_hw = tuple(ref_x.shape[-2:])

        def props_fn(p, fs, hw):
            return model.apply({"params": p}, fs, hw, input_hw, method=lambda m, fs, hw, ih: m.proposals(
                m.rpn_outputs(fs, ih), hw, train=False))
        props = jax.jit(props_fn)(params, feats, hw)
        n = int(props["valid"][0].sum())
        print(f"{name} proposals: ours {n}, torchvision {len(ref_props)}")
        ours_props = np.asarray(props["boxes"][0, :n])
        scale = max(np.abs(ref_props).max(), 1.0)
        if exact:
            assert n == len(ref_props)
            errs["proposals"] = float(np.abs(ours_props - ref_props).max() / scale)
            print(f"{name} proposals: max abs diff {np.abs(ours_props - ref_props).max():.2e} px")
            assert errs["proposals"] <= 1e-5
        else:  # near-tied scores may swap ranks or flip an NMS decision: compare as sets
            d = np.abs(ours_props[:, None] - ref_props[None]).max(-1) / scale
            errs["proposals_matched"] = float((d.min(0) <= 1e-5).mean())
            errs["proposals"] = float(np.median(d.min(0)))
            print(f"{name} proposals: {errs['proposals_matched']:.4f} of torchvision's matched")
            assert abs(n - len(ref_props)) <= 0.005 * len(ref_props) and errs["proposals_matched"] >= 0.99

        # box head on torchvision's proposals
        box_feats = tv.roi_heads.box_roi_pool(ref_feats, [torch.from_numpy(ref_props)], il.image_sizes)
        ref_cls, ref_reg = tv.roi_heads.box_predictor(tv.roi_heads.box_head(box_feats))
        cls, reg = jax.jit(lambda p, fs, b: model.apply({"params": p}, fs, b, input_hw,
                                                         method=MaskRCNN.box_head))(
            params, feats, jnp.asarray(ref_props[None]))
        errs["class_logits"] = assert_close(f"{name} class logits", cls[0], ref_cls.numpy())
        errs["box_deltas"] = assert_close(f"{name} box deltas", reg[0], ref_reg.numpy())

        # full torchvision detections, then the mask head on its (resized-frame) boxes
        ref_out = tv([to_tensor(img)])[0]
        dets, _ = tv.roi_heads(ref_feats, [torch.from_numpy(ref_props)], il.image_sizes)
        ref_boxes = dets[0]["boxes"]
        assert len(ref_boxes) > 0, "the random reference model detects nothing: the test needs detections"
        mask_feats = tv.roi_heads.mask_roi_pool(ref_feats, [ref_boxes], il.image_sizes)
        ref_mlog = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(mask_feats))
        mlog = jax.jit(lambda p, fs, b: model.apply({"params": p}, fs, b, input_hw, method=MaskRCNN.mask_head))(
            params, feats, jnp.asarray(ref_boxes.numpy()[None]))
        errs["mask_logits"] = assert_close(f"{name} mask logits", mlog[0], nhwc(ref_mlog))

    # end to end: the predictor on the uint8 photo vs torchvision's eval forward
    pred = MaskRCNNPredictor.from_checkpoint(tmp_path / "sj")
    out = pred(img)
    n_ref = len(ref_out["boxes"])
    print(f"{name} detections: ours {len(out['boxes'])}, torchvision {n_ref}")
    assert out["masks"].shape == (len(out["boxes"]), 1, *img.shape[:2]) and out["labels"].dtype == np.int64
    rb, rl = ref_out["boxes"].numpy(), ref_out["labels"].numpy()
    if exact:
        assert len(out["boxes"]) == n_ref
        np.testing.assert_array_equal(out["labels"], rl)
        mine, theirs = np.arange(n_ref), np.arange(n_ref)
    else:  # match each reference detection to ours (same label, box within 1e-2 px)
        d = np.abs(out["boxes"][:, None] - rb[None]).max(-1) + 1e9 * (out["labels"][:, None] != rl[None])
        theirs = np.where(d.min(0) <= 1e-2)[0]
        mine = d.argmin(0)[theirs]
        errs["det_matched"] = len(theirs) / max(n_ref, 1)
        print(f"{name} detections: {errs['det_matched']:.3f} of torchvision's matched")
        assert errs["det_matched"] >= 0.95 and abs(len(out["boxes"]) - n_ref) <= 0.05 * n_ref
    errs["det_boxes_px"] = float(np.abs(out["boxes"][mine] - rb[theirs]).max())
    errs["det_scores"] = float(np.abs(out["scores"][mine] - ref_out["scores"].numpy()[theirs]).max())
    errs["det_masks"] = float(np.abs(out["masks"][mine] - ref_out["masks"].numpy()[theirs]).max())
    print(f"{name} detections: box {errs['det_boxes_px']:.2e} px, score {errs['det_scores']:.2e}, "
          f"mask prob {errs['det_masks']:.2e}")
    assert errs["det_boxes_px"] <= 1e-2 and errs["det_scores"] <= 1e-4 and errs["det_masks"] <= 1e-3
    return errs, meta


def test_tiny_parity_and_meta(tmp_path):
    errs, meta = run_parity(tmp_path, tiny_torch(0), ("--variant", "mask_rcnn_tiny", "--bn-eps", "1e-5"))
    kw = meta["model_kwargs"]
    assert kw["num_classes"] == 5 and kw["bn_eps"] == 1e-5 and meta["source"]["bn_eps_from"] == "argument"
    assert kw["anchor_sizes"] == [[8], [16], [32], [64], [128]] and kw["aligned"] is False


def test_round_trip_strict(tmp_path):
    tv = tiny_torch(1)
    convert_cli(tmp_path, tv, "--variant", "mask_rcnn_tiny", "--bn-eps", "1e-5")
    assert cli(["maskrcnn", "--reverse", str(tmp_path / "sj"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = tiny_torch(2)
    fresh.load_state_dict(back, strict=True)
    for k, v in tv.state_dict().items():
        assert torch.equal(back[k], v), k


def test_tiny_v2_parity_and_round_trip(tmp_path):
    """The v2 architecture (BN in FPN/heads, 2-conv RPN head, conv+fc box head), narrow."""
    tv = tiny_torch(4, v2=True)
    errs, meta = run_parity(tmp_path, tv, ("--variant", "mask_rcnn_tiny"), "tiny v2")
    kw = meta["model_kwargs"]
    assert kw["head_norm"] and kw["rpn_conv_depth"] == 2 and kw["box_convs"] == [32, 32]
    assert kw["bn_eps"] == 1e-5 and meta["source"]["batchnorm"] == "nn.BatchNorm2d"
    assert cli(["maskrcnn", "--reverse", str(tmp_path / "sj"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    tiny_torch(5, v2=True).load_state_dict(back, strict=True)
    for k, v in tv.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], v), k


def test_legacy_keys_convert_identically(tmp_path):
    tv = tiny_torch(3)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    legacy = {}
    for k, v in sd.items():
        k2 = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for blk in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k2 = k2.replace(f"backbone.fpn.{blk}.{i}.0.", f"backbone.fpn.{blk}.{i}.")
        for i in range(2):
            k2 = k2.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[k2] = v
    assert legacy.keys() != sd.keys()
    p1, m1, _ = conv.from_state_dict(sd, variant="mask_rcnn_tiny")
    p2, m2, r2 = conv.from_state_dict(legacy, variant="mask_rcnn_tiny")
    assert m2["source"]["layout"] == "legacy" and m1["source"]["layout"] == "current"
    assert m1["model_kwargs"]["bn_eps"] == 0.0  # FrozenBatchNorm2d without counters: the legacy guess
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)


def test_rejects_other_models():
    with pytest.raises(ConversionError, match="not a torchvision Mask R-CNN"):
        conv.from_state_dict({"patch_embed.proj.weight": np.zeros((4, 3, 2, 2), np.float32)})
    tv = tiny_torch(0)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    sd["roi_heads.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match="unmapped"):
        conv.from_state_dict(sd, variant="mask_rcnn_tiny")
    with pytest.raises(ConversionError, match="anchors per location"):
        conv.from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()}, variant="mask_rcnn_tiny",
                             model_kwargs={"aspect_ratios": (1.0,)})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["coco", "builder", "v2"])
def test_r50_parity(tmp_path, kind):
    """Full ResNet-50-FPN at min_size = max_size = 320: the COCO-weights architecture
    (FrozenBatchNorm2d eps 0, the legacy default), torchvision's weights=None builder
    (nn.BatchNorm2d, eps 1e-5) and maskrcnn_resnet50_fpn_v2."""
    tv = r50_torch(0, kind, min_size=320, max_size=320)
    errs, meta = run_parity(tmp_path, tv, ("--model-kwargs", '{"min_size": 320, "max_size": 320}'),
                            f"r50 {kind}", exact=False)
    kw = meta["model_kwargs"]
    assert meta["model"] == ("mask_rcnn_r50_fpn_v2" if kind == "v2" else "mask_rcnn_r50_fpn")
    assert kw["bn_eps"] == (0.0 if kind == "coco" else 1e-5)
    if kind != "coco":  # the round trip into a fresh torchvision model, strict
        assert cli(["maskrcnn", "--reverse", str(tmp_path / "sj"), str(tmp_path / "back.pth")]) == 0
        r50_torch(1, kind).load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
