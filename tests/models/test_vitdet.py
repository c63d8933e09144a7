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
from segjax.convert import vitdet as conv  # noqa: E402
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN  # noqa: E402

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
